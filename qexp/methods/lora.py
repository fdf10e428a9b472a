"""LoRA on the unquantized model (fp upper-bound baseline), and the LoRA factors others reuse."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..quant import QuantWeight, act_linear, fp_linear
from . import register
from .base import Method, MethodConfig, MethodLayer, param_dtype


def lora_factors(d_in: int, d_out: int, rank: int, like: Tensor) -> tuple[nn.Parameter, nn.Parameter]:
    """PEFT init: ``A [r, d_in]`` Kaiming-uniform (a=sqrt 5), ``B [d_out, r]`` zero, so BA = 0;
    on ``like``'s device in the training dtype of a model in ``like``'s dtype (:func:`param_dtype`)."""
    dtype = param_dtype(like.dtype)
    a = torch.empty(rank, d_in, dtype=dtype, device=like.device)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return nn.Parameter(a), nn.Parameter(torch.zeros(d_out, rank, dtype=dtype, device=like.device))


def lora_update(x: Tensor, a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """``(α/r)·x Aᵀ Bᵀ`` in the activation dtype (the factors cast to it)."""
    return scaling * act_linear(act_linear(x, a), b)


@dataclass
class LoRAConfig(MethodConfig):
    rank: int = 8
    alpha: float = 16.0  # update is (alpha / rank) * B A


class LoRALinear(MethodLayer):
    """``y = x Wᵀ + (α/r) x Aᵀ Bᵀ`` on a frozen float weight ``W`` (in the model dtype)."""

    ON_GRID = False

    def __init__(self, weight: Tensor, bias: Tensor | None, rank: int, alpha: float) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.lora_A, self.lora_B = lora_factors(weight.shape[1], weight.shape[0], rank, weight)
        self.scaling = alpha / rank

    def delta(self) -> Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: Tensor) -> Tensor:
        return act_linear(x, self.weight, self.bias) + lora_update(x, self.lora_A, self.lora_B, self.scaling)

    def merge(self) -> nn.Module:
        """Fold the adapter into the float weight, rounded to its dtype: an fp model, not an integer one."""
        return fp_linear((self.weight + self.delta().detach()).to(self.weight.dtype), self.bias)


@register
class LoRA(Method):
    """fp LoRA on the unquantized model: the accuracy upper bound, not a quantized result."""

    name = "lora"
    Config = LoRAConfig
    NEEDS_BASE = False

    def layer(self, name: str, linear: nn.Linear, qw: QuantWeight | None) -> nn.Module:
        return LoRALinear(linear.weight, linear.bias, self.cfg.rank, self.cfg.alpha)
