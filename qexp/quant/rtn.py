"""Round-to-nearest with an optional range search (min-max or Lp-norm, LR-QAT uses p=4)."""

from __future__ import annotations

import torch
from torch import Tensor

from .grid import QuantSpec, QuantWeight, dequantize, grouped, quantize_codes


def minmax_range(w: Tensor, spec: QuantSpec, shrink: float | Tensor = 1.0) -> tuple[Tensor, Tensor]:
    """Scale and zero that cover each group's range (times ``shrink``), clipping nothing at 1.

    Asymmetric: the range always contains 0 (as GPTQ does), integer zero point.
    Symmetric: ``s = max(|min| / |qmin|, max / qmax)`` (L4Q's init), zero 0.
    """
    wg = grouped(w.float(), spec.group_size)
    lo = wg.amin(-1).clamp(max=0) * shrink
    hi = wg.amax(-1).clamp(min=0) * shrink
    if spec.symmetric:
        scale = torch.maximum(lo.abs() / abs(spec.qmin), hi / spec.qmax)
        scale = scale.clamp(min=1e-8)
        return scale, torch.zeros_like(scale)
    scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp(min=1e-8)
    zero = torch.round(-lo / scale).clamp(spec.qmin, spec.qmax)
    return scale, zero


def search_range(
    w: Tensor, spec: QuantSpec, p: float = 2.0, grid: int = 100, min_shrink: float = 0.2
) -> tuple[Tensor, Tensor]:
    """Per group, the shrink of the min-max range that minimises ``sum |W - Q(W)|^p``."""
    w = w.float()
    best_scale, best_zero = minmax_range(w, spec)
    best_err = _lp_err(w, best_scale, best_zero, spec, p)
    for shrink in torch.linspace(1.0, min_shrink, grid)[1:].tolist():
        scale, zero = minmax_range(w, spec, shrink)
        err = _lp_err(w, scale, zero, spec, p)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _lp_err(w: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec, p: float) -> Tensor:
    q = dequantize(quantize_codes(w, scale, zero, spec), scale, zero, spec.group_size)
    return grouped((q - w).abs().pow(p), spec.group_size).sum(-1)


def rtn(w: Tensor, spec: QuantSpec, range_method: str = "minmax", p: float = 4.0, grid: int = 100) -> QuantWeight:
    """Quantize a ``[d_out, d_in]`` weight by round-to-nearest on the chosen range."""
    spec.groups(w.shape[1])  # raises if group_size does not divide d_in
    if range_method == "minmax":
        scale, zero = minmax_range(w, spec)
    elif range_method == "lp":
        scale, zero = search_range(w, spec, p=p, grid=grid)
    else:
        raise ValueError(f"range_method={range_method!r}: choose 'minmax' or 'lp'")
    return QuantWeight(quantize_codes(w.float(), scale, zero, spec), scale, zero, spec)
