"""Full-weight QAT with an LSQ/LSQ+ quantizer: the memory upper bound the QA-PEFT papers compare to.

Every target weight ``W`` trains in full precision together with a per-group scale ``s`` and
float offset ``β``: ``W_q = s·⌊clamp((W − β)/s, qmin, qmax)⌉ + β`` (STE round; methods.md §4.5/§6,
L4Q's "LSQ" baseline). Init from the base quantizer (``quant.sym``, ``quant.range``): ``s`` is
its scale and ``β = −z·s`` its zero point as an offset, so with RTN the start is exactly the RTN
model. The merge stores ``w̃``, ``s`` and the float zero ``−β/s``, the operands the training
forward passes to the shared ``dequantize``: bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..quant import QuantLinear, QuantWeight, act_linear
from ..quant.lsq import grad_scale, lsq_codes, lsq_fake_quant, lsq_grad_scale, offset_zero
from . import register
from .base import Method, MethodConfig, MethodLayer, param_dtype, scale_dtype


@dataclass
class QATConfig(MethodConfig):
    learn_offset: bool = True  # LSQ+: β trains; False: β stays at its init (0 on a symmetric grid = LSQ)
    lsq_grad_scale: bool = True  # LSQ's 1/√(g·Q_P) on ∂L/∂s (and ∂L/∂β), as in Esser et al. 2020
    weight_lr: float | None = None  # lr of the fp weights (None: train.lr); s and β always use train.lr


class QATLinear(MethodLayer):
    """A target linear under full QAT: trainable fp ``weight`` (in :func:`param_dtype` of the model
    dtype), fp32 ``scale`` and (optionally) ``offset``; the fake-quant weight is formed in fp32."""

    def __init__(self, weight: Tensor, bias: Tensor | None, qw: QuantWeight, learn_offset: bool,
                 use_grad_scale: bool) -> None:
        super().__init__()
        self.spec = qw.spec
        self.weight = nn.Parameter(weight.detach().to(param_dtype(weight.dtype), copy=True))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.scale = nn.Parameter(qw.scale.to(scale_dtype(weight.dtype), copy=True))
        offset = (-qw.zero * qw.scale).to(scale_dtype(weight.dtype))
        if learn_offset:
            self.offset = nn.Parameter(offset)
        else:
            self.register_buffer("offset", offset)
        self.gscale = lsq_grad_scale(self.spec, weight.shape[1]) if use_grad_scale else 1.0

    def forward(self, x: Tensor) -> Tensor:
        s, beta = self.scale, self.offset
        if self.gscale != 1.0:
            s, beta = grad_scale(s, self.gscale), grad_scale(beta, self.gscale)
        return act_linear(x, lsq_fake_quant(self.weight, s, beta, self.spec), self.bias)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        _, codes, _ = lsq_codes(self.weight, self.scale, self.offset, self.spec)
        s = self.scale.detach()
        return QuantLinear(QuantWeight(codes, s, offset_zero(s, self.offset.detach()), self.spec), self.bias)


@register
class QAT(Method):
    """Full-weight LSQ(+) QAT, starting from the base quantizer's grid."""

    name = "qat"
    Config = QATConfig

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """The fp weights (at ``weight_lr``, with weight decay) and the quantizer's ``s``/``β`` (no decay)."""
        layers = [m for m in model.modules() if isinstance(m, QATLinear)]
        quant = [p for m in layers for p in (m.scale, m.offset) if isinstance(p, nn.Parameter)]
        weight_lr = lr if self.cfg.weight_lr is None else self.cfg.weight_lr
        return [{"params": [m.weight for m in layers], "lr": weight_lr, "weight_decay": weight_decay},
                {"params": quant, "lr": lr, "weight_decay": 0.0}]

    def layer(self, name: str, linear: nn.Linear, qw: QuantWeight | None) -> nn.Module:
        return QATLinear(linear.weight, linear.bias, qw, self.cfg.learn_offset, self.cfg.lsq_grad_scale)
