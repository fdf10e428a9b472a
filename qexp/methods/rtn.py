"""RTN / GPTQ post-training quantization: the frozen base itself, no training."""

from __future__ import annotations

from torch import nn

from ..quant import QuantLinear, QuantWeight
from . import register
from .base import Method


@register
class PTQ(Method):
    """The base quantizer's output as the final model (``quant.init`` picks RTN or GPTQ)."""

    name = "rtn"
    TRAINS = False

    def layer(self, name: str, linear: nn.Linear, qw: QuantWeight | None) -> nn.Module:
        return QuantLinear(qw, linear.bias)
