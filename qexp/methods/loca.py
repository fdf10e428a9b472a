"""LoCA (Du et al., ICLR 2025; a QWHA baseline): location-aware cosine adaptation.

``ΔW = α · iDCT₂(S(c, l))``: ``p`` coefficients ``c`` (zero at init) scattered into a ``[d_out, d_in]``
DCT spectrum at locations ``l`` (``[p, 2]``, real-valued, rounded to the grid in the forward),
mapped to a dense update by the 2-D inverse DCT. Both train, as the paper does:

* ``c`` by its gradient, ``∂L/∂c_i = G[l_i]`` with ``G = ∂L/∂F`` the dense spectrum gradient;
* ``l`` by a finite-difference estimate, the locations being discrete: moving coefficient ``i``
  one cell changes ``L`` by about ``c_i·ΔG``, so ``∂L/∂l_i ≈ c_i·(G[l_i + e] − G[l_i − e]) / 2``
  along each axis ``e`` (one-sided at the border). The estimate is collected in the backward pass
  (``loc_grad``, outside autograd and gradient clipping) and applied by :class:`LoCAOptimizer`.
* Alternating schedule (:class:`LoCAOptimizer`): coefficients only for the first ``loc_start`` of
  the steps (``c = 0`` gives no location signal), then alternately one location step (locations
  only) per ``loc_every`` steps until ``loc_end``, then coefficients only with the locations frozen.
  Initial locations are uniform at random. The fractions and the location lr are this
  implementation's defaults (``conf/method/loca.yaml``), not values taken from the paper.

On QWHA's integer base with QWHA's budget ``p = r·(d_in + d_out)`` and α in QWHA's units (see
:mod:`qexp.methods.ssh`). Not on the grid: deployed = integer base + fp sparse adapter at the final
(rounded) locations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..quant import QuantLinear, QuantWeight
from . import register
from .base import MethodConfig, MethodLayer
from .qwha import QWHADeployed, SparseBaseline, _random_mask, adapter_forward, budget, spectral_delta


@dataclass
class LoCAConfig(MethodConfig):
    rank: int = 8  # budget p = rank·(d_in + d_out) per layer (QWHA's rule)
    alpha: float = 4000.0  # ΔW = α·iDCT₂(F) in QWHA's units
    loc_lr: float = 0.5  # Adam lr of the locations (grid cells per step, at most)
    loc_start: float = 0.1  # fraction of the steps before the first location step
    loc_end: float = 0.8  # fraction of the steps after which the locations are frozen
    loc_every: int = 2  # one location step per loc_every steps between loc_start and loc_end

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"method.rank={self.rank} must be positive")
        if not (0.0 <= self.loc_start <= self.loc_end <= 1.0) or self.loc_every < 1:
            raise ValueError(f"method.loc_start={self.loc_start}, loc_end={self.loc_end}, loc_every={self.loc_every}: "
                             "need 0 <= loc_start <= loc_end <= 1 and loc_every >= 1")


class _Scatter(torch.autograd.Function):
    """``F = S(c, round(l))``; backward: ``G[l]`` for ``c`` and the finite-difference location
    estimate, added into ``loc_grad`` (no autograd gradient for ``l``)."""

    @staticmethod
    def forward(ctx, c: Tensor, loc: Tensor, loc_grad: Tensor, shape: tuple[int, int]) -> Tensor:
        r, q = _cells(loc, shape)
        ctx.save_for_backward(c, r, q, loc_grad)
        ctx.shape = shape
        f = c.new_zeros(shape)
        return f.index_put_((r, q), c, accumulate=True)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None, None]:
        c, r, q, loc_grad = ctx.saved_tensors
        rows, cols = ctx.shape
        lo_r, hi_r = (r - 1).clamp(min=0), (r + 1).clamp(max=rows - 1)
        lo_q, hi_q = (q - 1).clamp(min=0), (q + 1).clamp(max=cols - 1)
        d_r = (g[hi_r, q] - g[lo_r, q]) / (hi_r - lo_r).clamp(min=1)
        d_q = (g[r, hi_q] - g[r, lo_q]) / (hi_q - lo_q).clamp(min=1)
        loc_grad.add_(torch.stack((c.detach() * d_r, c.detach() * d_q), dim=1).to(loc_grad.dtype))
        return g[r, q], None, None, None


def _cells(loc: Tensor, shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    r = loc[:, 0].detach().round().clamp(0, shape[0] - 1).long()
    q = loc[:, 1].detach().round().clamp(0, shape[1] - 1).long()
    return r, q


class LoCALinear(MethodLayer):
    """Frozen integer base + ``p`` DCT coefficients ``c`` at learnable locations ``loc``."""

    ON_GRID = False
    DEPLOYED = "integer base + fp adapter"

    def __init__(self, qw: QuantWeight, bias: Tensor | None, loc: Tensor, c: Tensor, scale: float) -> None:
        super().__init__()
        self.base = QuantLinear(qw, bias)
        self.scale = scale
        self.c = nn.Parameter(c.detach().clone())
        self.loc = nn.Parameter(loc.detach().float().clone())  # fp32; its gradient is loc_grad, set by the optimizer
        self.register_buffer("loc_grad", torch.zeros_like(self.loc), persistent=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.base.out_features, self.base.in_features

    @property
    def idx(self) -> Tensor:
        """Flat indices of the current (rounded) locations."""
        r, q = _cells(self.loc, self.shape)
        return r * self.shape[1] + q

    def delta(self) -> Tensor:
        f = _Scatter.apply(self.c * self.scale, self.loc, self.loc_grad, self.shape)
        return spectral_delta(f, "dct", True)

    def forward(self, x: Tensor) -> Tensor:
        return adapter_forward(self.base, self.delta(), x)

    def merge(self) -> nn.Module:
        uniq, inv = torch.unique(self.idx, return_inverse=True)  # coefficients sharing a cell add up
        c = self.c.detach().new_zeros(uniq.numel()).index_add_(0, inv, self.c.detach())
        return QWHADeployed(self.base, uniq, c, self.scale, "dct", True)


class LoCAOptimizer(torch.optim.AdamW):
    """AdamW on ``c`` and on the locations, alternating as LoCA trains (see the module docstring).
    The step count lives in the param groups, so ``state_dict()`` carries it across a resume."""

    def __init__(self, layers: list[LoCALinear], lr: float, weight_decay: float, total_steps: int,
                 cfg: LoCAConfig) -> None:
        groups = [{"params": [m.c for m in layers], "lr": lr, "weight_decay": weight_decay, "loca_step": 0},
                  {"params": [m.loc for m in layers], "lr": cfg.loc_lr, "weight_decay": 0.0, "loca_step": 0}]
        super().__init__(groups, lr=lr, weight_decay=weight_decay)
        self.layers = layers
        self.start, self.end = int(cfg.loc_start * total_steps), int(cfg.loc_end * total_steps)
        self.every = cfg.loc_every

    def is_location_step(self, t: int) -> bool:
        """Step ``t`` (0-based) moves the locations (and only them)."""
        return self.start <= t < self.end and (t - self.start) % self.every == self.every - 1

    @torch.no_grad()
    def step(self, closure=None):
        t = int(self.param_groups[0]["loca_step"])
        moving = self.is_location_step(t)
        for m in self.layers:
            m.loc.grad = m.loc_grad.clone() if moving else None
            if moving:
                m.c.grad = None
            m.loc_grad.zero_()
        loss = super().step(closure)
        for m in self.layers:
            m.loc[:, 0].clamp_(0, m.shape[0] - 1)
            m.loc[:, 1].clamp_(0, m.shape[1] - 1)
        for g in self.param_groups:
            g["loca_step"] = t + 1
        return loss


@register
class LoCA(SparseBaseline):
    name = "loca"
    Config = LoCAConfig

    def layer(self, name: str, linear: nn.Linear, qw: QuantWeight | None) -> nn.Module:
        p = budget(self.cfg.rank, name, linear)
        d_out, d_in = linear.weight.shape
        idx = _random_mask((d_out, d_in), p, None, linear.weight.device).flatten().nonzero().squeeze(1)
        loc = torch.stack((idx // d_in, idx % d_in), dim=1)
        c = torch.zeros(p, dtype=torch.float32, device=linear.weight.device)
        return LoCALinear(qw, linear.bias, loc, c, self.cfg.alpha)

    def optimizer(self, model: nn.Module, lr: float, weight_decay: float, total_steps: int) -> torch.optim.Optimizer:
        layers = [m for m in model.modules() if isinstance(m, LoCALinear)]
        return LoCAOptimizer(layers, lr, weight_decay, total_steps, self.cfg)
