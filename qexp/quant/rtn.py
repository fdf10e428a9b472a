"""Round-to-nearest with an optional range search (min-max or Lp-norm, LR-QAT uses p=4)."""

from __future__ import annotations

import torch
from torch import Tensor

from .grid import QuantSpec, QuantWeight, grouped, quantize_codes


def _range_to_grid(lo: Tensor, hi: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Scale and zero for group ranges ``[lo, hi]`` (``lo <= 0 <= hi``)."""
    if spec.symmetric:
        scale = torch.maximum(lo.abs() / abs(spec.qmin), hi / spec.qmax).clamp(min=1e-8)
        return scale, torch.zeros_like(scale)
    scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp(min=1e-8)
    return scale, torch.round(-lo / scale).clamp(spec.qmin, spec.qmax)


def _group_range(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    wg = grouped(w.float(), spec.group_size)
    return wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)


def minmax_range(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Scale and zero that cover each group's range, clipping nothing.

    Asymmetric: the range always contains 0 (as GPTQ does), integer zero point.
    Symmetric: ``s = max(|min| / |qmin|, max / qmax)`` (L4Q's init), zero 0.
    """
    return _range_to_grid(*_group_range(w, spec), spec)


@torch.no_grad()
def search_range(
    w: Tensor, spec: QuantSpec, p: float = 2.0, grid: int = 100, min_shrink: float = 0.2
) -> tuple[Tensor, Tensor]:
    """Per group, the shrink of the min-max range (``grid`` steps from 1 down to ``min_shrink``)
    that minimises ``sum |W - Q(W)|^p``."""
    wg = grouped(w.float(), spec.group_size)
    lo, hi = _group_range(w, spec)
    best_err = torch.full_like(lo, float("inf"))
    best_scale, best_zero = torch.empty_like(lo), torch.empty_like(lo)
    for shrink in torch.linspace(1.0, min_shrink, grid).tolist():
        scale, zero = _range_to_grid(lo * shrink, hi * shrink, spec)
        s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
        err = (torch.round(wg / s).add_(z).clamp_(spec.qmin, spec.qmax).sub_(z).mul_(s).sub_(wg)).abs_()
        err = err.square_() if p == 2 else err.pow_(p)
        err = err.sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def fit_range(w: Tensor, spec: QuantSpec, range_method: str = "minmax", p: float = 4.0,
              grid: int = 100) -> tuple[Tensor, Tensor]:
    """Scale and zero ``[d_out, n_groups]`` by min-max or by the Lp range search."""
    if range_method == "minmax":
        return minmax_range(w, spec)
    if range_method == "lp":
        return search_range(w, spec, p=p, grid=grid)
    raise ValueError(f"quant.range={range_method!r}: choose 'minmax' or 'lp'")


def rtn(w: Tensor, spec: QuantSpec, range_method: str = "minmax", p: float = 4.0, grid: int = 100) -> QuantWeight:
    """Quantize a ``[d_out, d_in]`` weight by round-to-nearest on the chosen range."""
    spec.groups(w.shape[1])  # raises if group_size does not divide d_in
    scale, zero = fit_range(w, spec, range_method, p, grid)
    return QuantWeight(quantize_codes(w.float(), scale, zero, spec), scale, zero, spec)
