"""PEQA (Kim et al., NeurIPS 2023): only the quantization scales train; codes never change.

``Ŵ = s ⊙ (W̄₀ - z₀)`` with frozen integer codes and zero points from PTQ; ``s`` starts at
``s₀``. The merge swaps in the new scales, so it is exactly on the grid.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..quant import QuantLinear, QuantWeight, act_linear, dequantize
from . import register
from .base import Method, MethodLayer


class PEQALinear(MethodLayer):
    """Frozen codes and zeros, trainable scales in the base quantizer's fp32 (in every model dtype);
    the weight is dequantized in fp32 and cast to the activation dtype, as the merged QuantLinear."""

    def __init__(self, qw: QuantWeight, bias: Tensor | None) -> None:
        super().__init__()
        self.spec = qw.spec
        self.register_buffer("codes", qw.codes)
        self.register_buffer("zero", qw.zero.clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.scale = nn.Parameter(qw.scale.clone())

    def forward(self, x: Tensor) -> Tensor:
        return act_linear(x, dequantize(self.codes, self.scale, self.zero, self.spec.group_size), self.bias)

    def merge(self) -> nn.Module:
        return QuantLinear(QuantWeight(self.codes, self.scale.detach(), self.zero, self.spec), self.bias)


@register
class PEQA(Method):
    name = "peqa"

    def layer(self, name: str, linear: nn.Linear, qw: QuantWeight | None) -> nn.Module:
        return PEQALinear(qw, linear.bias)
