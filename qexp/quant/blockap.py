"""EfficientQAT's Block-AP (Chen et al., 2024): block-wise training of ALL parameters of each
quantized linear, the weight ``W``, the step size ``s`` and the zero point ``z``; a stage of the base
(``quant.init=blockap``), the first phase of ``method=efficientqat``.

``Ŵ = s·(clamp(⌊W/s⌉ + ⌊z⌉, q_min, q_max) − ⌊z⌉)`` per group, with the STE through both roundings;
``s`` and ``z`` start from the min-max grid (RTN, the released code's init), ``W`` from the fp weight.
Every block is trained to reproduce the fp block's output (:mod:`.blockwise`, AdamW without weight
decay; EfficientQAT's Llama-2-7B scripts: quantizer lr 1e-4, weight lr 1e-5 at w4g128, 4096 RedPajama
sequences of 2048 tokens, 2 epochs, batch 2). The result stores ``⌊clamp(⌊W/s⌉ + ⌊z⌉)⌉``, ``s`` and the
integer ``⌊z⌉``: the same weight the training forward computed (the merge of this stage is exact).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .blockwise import BlockQuantizer, reconstruct
from .grid import QuantSpec, QuantWeight, dequantize, grouped, quantize_codes, ste_round
from .rtn import minmax_range

QUANT_LR = 1e-4  # EfficientQAT's quant_lr (s and z)


class BlockAP(BlockQuantizer):
    """Trainable ``W`` (fp32 copy), ``s`` and float ``z`` of one linear; ``z`` is rounded (STE) where used."""

    def __init__(self, w: Tensor, spec: QuantSpec, lr: float = QUANT_LR, weight_lr: float = 1e-5) -> None:
        super().__init__()
        self.spec, self.lr, self.weight_lr = spec, lr, weight_lr
        scale, zero = minmax_range(w.detach().float(), spec)
        self.weight = nn.Parameter(w.detach().float().clone())
        self.scale = nn.Parameter(scale)
        self.zero = nn.Parameter(zero.float())

    def grid(self) -> tuple[Tensor, Tensor]:
        return self.scale.clamp(min=1e-8), ste_round(self.zero).clamp(self.spec.qmin, self.spec.qmax)

    def forward(self) -> Tensor:
        scale, zero = self.grid()
        g = self.spec.group_size
        codes = ste_round(grouped(self.weight, g) / scale.unsqueeze(-1)) + zero.unsqueeze(-1)
        codes = codes.clamp(self.spec.qmin, self.spec.qmax).reshape(self.weight.shape)
        return dequantize(codes, scale, zero, g)

    @torch.no_grad()
    def result(self) -> QuantWeight:
        scale, zero = (t.detach().clone() for t in self.grid())
        return QuantWeight(quantize_codes(self.weight.detach(), scale, zero, self.spec), scale, zero, self.spec)

    def param_groups(self) -> list[dict]:
        return [{"params": [self.scale, self.zero], "lr": self.lr}, {"params": [self.weight], "lr": self.weight_lr}]


def blockap_results(spec: QuantSpec, model: nn.Module, targets: dict[str, nn.Linear], calib_ids: Tensor,
                    epochs: int, batch: int, lr: float | None = None, weight_lr: float = 1e-5, seed: int = 0,
                    log: list | None = None) -> dict[str, QuantWeight]:
    """Block-AP for every target, block by block on ``calib_ids`` (see the module docstring)."""
    lr = QUANT_LR if lr is None else lr
    return reconstruct(model, targets, calib_ids, lambda n, lin: BlockAP(lin.weight, spec, lr, weight_lr), epochs,
                       batch, seed=seed, log=log)
