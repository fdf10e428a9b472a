"""QAT-LoRA (L4Q's own baseline, methods.md §6 and §4.5): an LSQ+ quantizer on the frozen ``W₀``
plus a separate 16-bit LoRA branch,

    ``y = x·Q_LSQ(W₀)ᵀ + (α/r)·x Aᵀ Bᵀ``,   ``Q_LSQ(W₀) = s·⌊clamp((W₀ − β)/s)⌉ + β``,

with a learned per-group scale ``s`` and float offset ``β`` (STE round; the gradients of
:mod:`qexp.quant.lsq` through autograd) and LoRA ``A`` (Kaiming-uniform), ``B`` (0). ``s`` and ``β``
start from the base quantizer (``−z·s``), so the first forward is exactly the base model.

Unlike L4Q, the LoRA sits OUTSIDE the quantizer: the trained ``BA`` cannot be folded into the codes
without a lossy re-quantization, so the deployed model is the integer base (the trained codes,
``s`` and zero ``−β/s``) + the 16-bit LoRA, mixed precision, NOT on the grid. Autograd keeps the
fake-quant weight's intermediates and forms the full weight gradient for ``∂L/∂s``, ``∂L/∂β``:
its training memory exceeds L4Q's (paper Table 1: 41.9 vs 25.4 GB on LLaMA-1 7B).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..quant import QuantLinear, QuantSpec, QuantWeight, act_linear
from ..quant.lsq import grad_scale, lsq_codes, lsq_fake_quant, lsq_grad_scale, offset_zero
from . import register
from .base import Method, MethodConfig, MethodLayer, scale_dtype
from .cloq import CLoQDeployed
from .lora import lora_factors, lora_update


@dataclass
class QATLoRAConfig(MethodConfig):
    rank: int = 4  # L4Q's rank for its baselines
    alpha: float = 16.0  # LoRA update (α/r)·BA
    lsq_grad_scale: bool = True  # LSQ's 1/√(g·Q_P) on ∂L/∂s and ∂L/∂β (Esser et al. 2020)


class QATLoRALinear(MethodLayer):
    """Frozen ``W₀`` (model dtype), trainable fp32 ``scale``/``offset`` and LoRA ``A``, ``B``."""

    ON_GRID = False
    DEPLOYED = "integer base + fp adapter"

    def __init__(self, weight: Tensor, bias: Tensor | None, qw: QuantWeight, rank: int, alpha: float,
                 use_grad_scale: bool) -> None:
        super().__init__()
        self.spec = qw.spec
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.scale = nn.Parameter(qw.scale.to(scale_dtype(weight.dtype), copy=True))
        self.offset = nn.Parameter((-qw.zero * qw.scale).to(scale_dtype(weight.dtype)))
        self.lora_A, self.lora_B = lora_factors(weight.shape[1], weight.shape[0], rank, weight)
        self.scaling = alpha / rank
        self.gscale = lsq_grad_scale(self.spec, weight.shape[1]) if use_grad_scale else 1.0

    def forward(self, x: Tensor) -> Tensor:
        s, beta = self.scale, self.offset
        if self.gscale != 1.0:
            s, beta = grad_scale(s, self.gscale), grad_scale(beta, self.gscale)
        w_q = lsq_fake_quant(self.weight.to(s.dtype), s, beta, self.spec)
        return act_linear(x, w_q, self.bias) + lora_update(x, self.lora_A, self.lora_B, self.scaling)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """The trained integer base (codes, ``s``, zero ``−β/s``) + the frozen 16-bit LoRA."""
        _, codes, _ = lsq_codes(self.weight.to(self.scale.dtype), self.scale, self.offset, self.spec)
        s = self.scale.detach()
        base = QuantLinear(QuantWeight(codes, s, offset_zero(s, self.offset.detach()), self.spec), self.bias)
        return CLoQDeployed(base, self.lora_A, self.lora_B, self.scaling)


@register
class QATLoRA(Method):
    """QAT-LoRA: LSQ+ on the frozen weight + a separate 16-bit LoRA (not mergeable onto the grid)."""

    name = "qat_lora"
    Config = QATLoRAConfig

    def __init__(self, cfg: QATLoRAConfig, spec: QuantSpec) -> None:
        if cfg.rank < 1:
            raise ConfigError(f"method.rank={cfg.rank} is not valid; choose a positive integer")
        if cfg.alpha <= 0:
            raise ConfigError(f"method.alpha={cfg.alpha} is not valid; choose a positive number")
        super().__init__(cfg, spec)

    def layer(self, name: str, linear: nn.Linear, qw: QuantWeight | None) -> nn.Module:
        c = self.cfg
        return QATLoRALinear(linear.weight, linear.bias, qw, c.rank, c.alpha, c.lsq_grad_scale)
