"""QA-LoRA (Xu et al., 2023): a group-pooled LoRA that folds into the zero points.

On the frozen base ``W_q = s·(W_int − z)`` (RTN or GPTQ, ``NEEDS_BASE``) the adapter sees the
input averaged over each quantization group, ``x̄ = AvgPool_g(x) ∈ R^{d_in/g}``:
``y = x W_qᵀ + (α/r)·x̄ Aᵀ Bᵀ`` with ``A [r, d_in/g]`` (Kaiming) and ``B [d_out, r]`` (zero).
Every input of group ``γ`` sees the same adapter weight ``(α/r)(BA)_{j,γ}/g``, so the merge
moves it into the zero point, ``z' = z − (α/r)(BA)_{j,γ}/(g·s_{j,γ})``: the integer codes never
change, and the merge is exact in real arithmetic (equal up to float rounding, measured as
``max_abs_logit_diff``) **only with float zero points** (``QuantWeight.integer_zero`` is False
after training; rounding ``z'`` to an integer format would be lossy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..quant import QuantLinear, QuantWeight, act_linear, dequantize
from . import register
from .base import Method, MethodConfig, MethodLayer
from .lora import lora_factors, lora_update


@dataclass
class QALoRAConfig(MethodConfig):
    rank: int = 8
    alpha: float = 16.0  # adapter scaling alpha / rank


class QALoRALinear(MethodLayer):
    """Frozen integer base (fp32 scales and zeros) + group-pooled LoRA in the training dtype of a
    model in ``dtype``; merges into float zero points (computed in fp32)."""

    ON_GRID = True  # codes stay on the integer grid ...
    FLOAT_ZERO: ClassVar[bool] = True  # ... but the merged zero points are floats

    def __init__(self, qw: QuantWeight, bias: Tensor | None, rank: int, alpha: float,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.spec = qw.spec
        d_out, d_in = qw.codes.shape
        self.groups, self.group_len = qw.spec.groups(d_in), qw.spec.group_len(d_in)
        self.register_buffer("codes", qw.codes)
        self.register_buffer("scale", qw.scale.detach().clone())
        self.register_buffer("zero", qw.zero.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        like = torch.empty(0, dtype=dtype, device=self.scale.device)
        self.lora_A, self.lora_B = lora_factors(self.groups, d_out, rank, like)
        self.scaling = alpha / rank

    def pool(self, x: Tensor) -> Tensor:
        """``AvgPool_g`` over the input features: ``[..., d_in] -> [..., d_in/g]``."""
        return x.unflatten(-1, (self.groups, self.group_len)).mean(-1)

    def forward(self, x: Tensor) -> Tensor:
        y = act_linear(x, dequantize(self.codes, self.scale, self.zero, self.spec.group_size), self.bias)
        return y + lora_update(self.pool(x), self.lora_A, self.lora_B, self.scaling)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """``z' = z − (α/r)(BA)/(g·s)``; same codes and scales."""
        delta = self.scaling * (self.lora_B.float() @ self.lora_A.float())  # [d_out, n_groups]
        zero = self.zero - delta / (self.group_len * self.scale)
        return QuantLinear(QuantWeight(self.codes, self.scale, zero, self.spec), self.bias)


@register
class QALoRA(Method):
    name = "qalora"
    Config = QALoRAConfig

    def layer(self, name: str, linear: nn.Linear, qw: QuantWeight | None) -> nn.Module:
        return QALoRALinear(qw, linear.bias, self.cfg.rank, self.cfg.alpha, linear.weight.dtype)
