"""LoftQ (Li et al. 2023) on qexp's uniform grid: L4Q's LoftQ* baseline (methods.md §6, §4.5).

An alternating initialization of a frozen integer base ``Q`` and a rank-r LoRA ``(α/r)·BA``
that together approximate the fp weight, ``T`` rounds from ``BA = 0``:

1. ``Q_t = q(W − (α/r)·B_{t−1}A_{t−1})``: round onto the uniform grid (RTN; L4Q's "*" marks
   uniform quantization instead of LoftQ's NF4);
2. ``(α/r)·B_t A_t = SVD_r(W − Q_t)``, the singular values split evenly between ``B`` and ``A``.

Then LoRA fine-tunes ``A, B`` on the frozen ``Q_T``. The grid (scale and zero per group) is fitted
once, on ``W`` (``method.refit=false``, the default): every round then rounds onto the same grid, so
each half-step is the exact minimizer of ``‖W − Q − (α/r)BA‖_F`` over its own variable (nearest grid
point; Eckart–Young with ``method.svd=exact``) and the error never rises. ``method.refit=true`` re-fits the range on
``W − BA`` at every round, as LoftQ's code re-quantizes from scratch; the error then need not fall.
The record's ``init.loftq_error`` lists the relative error after each round (mean over layers).

Deployment is mixed precision, NOT on the grid: integer base + 16-bit LoRA (the paper's ``4&16``),
as QLoRA's; merging the adapter would need a lossy re-quantization, which LoftQ does not do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..quant import QuantSpec, QuantWeight, quantize_codes, rtn
from . import register
from .base import Method, MethodConfig, param_dtype
from .cloq import CLoQLinear


@dataclass
class LoftQConfig(MethodConfig):
    rank: int = 4  # L4Q's LoRA rank for its baselines (methods.md §4.5)
    alpha: float = 16.0  # update (α/r)·BA, as qlora
    iters: int = 5  # T alternations (LoftQ: 1–5)
    refit: bool = False  # re-fit the grid's range on W − BA each round (LoftQ's code) instead of once on W
    range: str = "minmax"  # the grid's range: minmax | lp (quant.range's choices; the fit runs once unless refit)
    svd: str = "exact"  # exact (torch.linalg.svd, LoftQ's) | lowrank (randomized, rank + 8 columns, 4 power iterations)


def _svd_split(r: Tensor, rank: int, how: str = "exact") -> tuple[Tensor, Tensor]:
    """``B [d_out, r] = U√Σ``, ``A [r, d_in] = √ΣVᵀ`` of the best rank-``rank`` fit of ``r`` (``lowrank``:
    Halko et al.'s randomized SVD, near-best; a 4096 x 11008 exact SVD takes minutes on a CPU)."""
    if how == "exact":
        u, s, vh = torch.linalg.svd(r, full_matrices=False)
    else:
        u, s, v = torch.svd_lowrank(r, q=min(rank + 8, *r.shape), niter=4)
        vh = v.T
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root.unsqueeze(1) * vh[:rank]


@torch.no_grad()
def loftq_init(w: Tensor, spec: QuantSpec, rank: int, iters: int, refit: bool = False,
               range_method: str = "minmax", svd: str = "exact") -> tuple[QuantWeight, Tensor, Tensor, list[float]]:
    """``(Q_T, B, A, errors)`` with ``BA`` the LoRA's full update (scaling not applied) and
    ``errors[t] = ‖W − Q_t − B_tA_t‖_F / ‖W‖_F`` after round ``t`` (fp32 throughout)."""
    wf = w.detach().float()
    norm = float(wf.norm()) or 1.0
    grid = rtn(wf, spec, range_method)
    lowrank = torch.zeros_like(wf)
    errors: list[float] = []
    b = a = None
    for _ in range(iters):
        target = wf - lowrank
        if refit:
            grid = rtn(target, spec, range_method)
        else:  # the same scale and zero: round W − BA onto the grid fitted on W
            grid = QuantWeight(quantize_codes(target, grid.scale, grid.zero, spec), grid.scale, grid.zero, spec)
        b, a = _svd_split(wf - grid.dequantize(), rank, svd)
        lowrank = b @ a
        errors.append(float((wf - grid.dequantize() - lowrank).norm()) / norm)
    return grid, b, a, errors


@register
class LoftQ(Method):
    """LoftQ*: alternating quantize / SVD init on the uniform grid, then LoRA on the frozen base."""

    name = "loftq"
    Config = LoftQConfig
    NEEDS_BASE = False  # LoftQ makes its own base (the last round's Q_T)

    def __init__(self, cfg: LoftQConfig, spec: QuantSpec) -> None:
        if cfg.rank < 1:
            raise ConfigError(f"method.rank={cfg.rank} is not valid; choose a positive integer")
        if cfg.iters < 1:
            raise ConfigError(f"method.iters={cfg.iters} is not valid; choose T >= 1 alternations")
        if cfg.alpha <= 0:
            raise ConfigError(f"method.alpha={cfg.alpha} is not valid; choose a positive number")
        if cfg.range not in ("minmax", "lp"):
            raise ConfigError(f"method.range={cfg.range!r} is not valid; choose one of: minmax, lp")
        if cfg.svd not in ("exact", "lowrank"):
            raise ConfigError(f"method.svd={cfg.svd!r} is not valid; choose one of: exact, lowrank")
        super().__init__(cfg, spec)
        self.errors: list[list[float]] = []

    def layer(self, name: str, linear: nn.Linear, qw: QuantWeight | None) -> nn.Module:
        c = self.cfg
        if c.rank > min(linear.in_features, linear.out_features):
            raise ConfigError(f"method.rank={c.rank} exceeds min(d_in, d_out) of {name}")
        grid, b, a, errors = loftq_init(linear.weight, self.spec, c.rank, c.iters, c.refit, c.range, c.svd)
        self.errors.append(errors)
        scaling = c.alpha / c.rank
        k = math.sqrt(1.0 / scaling)  # (α/r)·(kB)(kA) = BA
        dtype = param_dtype(linear.weight.dtype)
        return CLoQLinear(grid, linear.bias, (k * a).to(dtype), (k * b).to(dtype), scaling, 0.0)

    def report(self) -> dict:
        """``loftq_error``: ``‖W − Q_t − B_tA_t‖_F / ‖W‖_F`` after each round, mean over the layers."""
        if not self.errors:
            return {}
        return {"loftq_error": [round(sum(e[t] for e in self.errors) / len(self.errors), 6)
                                for t in range(len(self.errors[0]))]}
