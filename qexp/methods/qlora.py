"""QLoRA-style baseline: fp LoRA on a frozen integer base (uniform grid, as L4Q's QLoRA*).

Not on the grid: the trained model is base + fp adapter (mixed precision). Its integer
deployment re-quantizes ``W_q + (α/r)BA`` with the base's grid, which is lossy; qexp reports
both (``ppl/<set>/unmerged`` and the merged-then-requantized ``ppl/<set>/final``).
NF4 with double quantization (the QLoRA paper) needs bitsandbytes on a GPU; here the base is
the configured uniform grid (RTN or GPTQ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..quant import QuantLinear, QuantWeight, rtn
from . import register
from .base import Method
from .lora import LoRAConfig, LoRALinear


@dataclass
class QLoRAConfig(LoRAConfig):
    requant_range: str = "minmax"  # range of the re-quantization at merge: minmax | lp


class QLoRALinear(LoRALinear):
    """LoRA over the frozen base dequantized (in fp32) to the model dtype ``dtype``, as QLoRA
    dequantizes to its compute dtype; merge re-quantizes (lossy, and says so)."""

    ON_GRID = False
    LOSSY_MERGE = True

    def __init__(self, qw: QuantWeight, bias, rank: int, alpha: float, requant_range: str,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(qw.dequantize().to(dtype), bias, rank, alpha)
        self.spec, self.requant_range = qw.spec, requant_range

    def merge(self) -> nn.Module:
        merged = self.weight + self.delta().detach()
        return QuantLinear(rtn(merged, self.spec, self.requant_range), self.bias)


@register
class QLoRA(Method):
    name = "qlora"
    Config = QLoRAConfig
    EVAL_UNMERGED = True

    def layer(self, name: str, linear: nn.Linear, qw: QuantWeight | None) -> nn.Module:
        c = self.cfg
        return QLoRALinear(qw, linear.bias, c.rank, c.alpha, c.requant_range, linear.weight.dtype)
