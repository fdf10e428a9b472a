"""OmniQuant, weight-only (Shao et al., ICLR 2024): learnable weight clipping (LWC) trained by
block-wise reconstruction; a range stage of the base (``quant.init=omniquant``).

Per group of ``g`` weights, two clip factors ``γ = σ(a)`` and ``β = σ(b)`` (σ the sigmoid) shrink the
group's range: ``hi = γ·max(W)``, ``lo = β·min(W)``; the grid is the usual one on ``[lo, hi]``
(asymmetric: ``s = (hi − lo)/(2^b − 1)``, ``z = ⌊−lo/s⌉``, with the STE through both roundings;
symmetric: ``s = max(|lo|/2^(b−1), hi/(2^(b−1) − 1))``, ``z = 0``). ``a`` and ``b`` start at 4
(``σ(4) ≈ 0.982``, the released code's init) and train with AdamW (lr 1e-2, no weight decay, the
code's defaults) to minimise each block's output error (:mod:`.blockwise`). The weights themselves
never change: OmniQuant's result is RTN on the learned ranges. LET (the equivalent transformation of
the weight-activation setting) is not part of the weight-only method and is not implemented.
Paper settings: 128 WikiText-2 sequences of 2048 tokens, 20 epochs (40 at W2A16), batch 1.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .blockwise import BlockQuantizer, reconstruct
from .grid import QuantSpec, QuantWeight, dequantize, grouped, quantize_codes, ste_round

LWC_INIT = 4.0  # σ(4) ≈ 0.982: the released code's initial clip factor
LWC_LR = 1e-2  # the released code's lwc_lr


def lwc_grid(lo: Tensor, hi: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Differentiable scale and zero for group ranges ``[lo, hi]`` (``lo <= 0 <= hi``), as
    :func:`.rtn._range_to_grid` but with the STE through the zero point's rounding."""
    if spec.symmetric:
        scale = torch.maximum(lo.abs() / abs(spec.qmin), hi / spec.qmax).clamp(min=1e-8)
        return scale, torch.zeros_like(scale)
    scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp(min=1e-8)
    return scale, ste_round(-lo / scale).clamp(spec.qmin, spec.qmax)


class LWC(BlockQuantizer):
    """Learnable weight clipping on the frozen weight ``w`` (fp32): ``a``, ``b`` per group."""

    def __init__(self, w: Tensor, spec: QuantSpec, lr: float = LWC_LR, init: float = LWC_INIT) -> None:
        super().__init__()
        self.spec, self.lr = spec, lr
        self.register_buffer("w", w.detach().float().clone())
        wg = grouped(self.w, spec.group_size)
        self.register_buffer("wmin", wg.amin(-1).clamp(max=0))
        self.register_buffer("wmax", wg.amax(-1).clamp(min=0))
        self.a = nn.Parameter(torch.full_like(self.wmax, init))  # upper clip logit
        self.b = nn.Parameter(torch.full_like(self.wmin, init))  # lower clip logit

    def grid(self) -> tuple[Tensor, Tensor]:
        return lwc_grid(torch.sigmoid(self.b) * self.wmin, torch.sigmoid(self.a) * self.wmax, self.spec)

    def forward(self) -> Tensor:
        scale, zero = self.grid()
        codes = (ste_round(grouped(self.w, self.spec.group_size) / scale.unsqueeze(-1)) + zero.unsqueeze(-1))
        codes = codes.clamp(self.spec.qmin, self.spec.qmax).reshape(self.w.shape)
        return dequantize(codes, scale, zero, self.spec.group_size)

    @torch.no_grad()
    def result(self) -> QuantWeight:
        scale, zero = (t.detach() for t in self.grid())
        return QuantWeight(quantize_codes(self.w, scale, zero, self.spec), scale, zero, self.spec)

    def param_groups(self) -> list[dict]:
        return [{"params": [self.a, self.b], "lr": self.lr}]


def omniquant_results(spec: QuantSpec, model: nn.Module, targets: dict[str, nn.Linear], calib_ids: Tensor,
                      epochs: int, batch: int, lr: float | None = None, seed: int = 0,
                      log: list | None = None) -> dict[str, QuantWeight]:
    """LWC for every target, trained block by block on ``calib_ids`` (see the module docstring)."""
    lr = LWC_LR if lr is None else lr
    return reconstruct(model, targets, calib_ids, lambda n, lin: LWC(lin.weight, spec, lr), epochs, batch,
                       seed=seed, log=log)
