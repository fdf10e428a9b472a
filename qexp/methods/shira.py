"""SHiRA (Bhardwaj et al., 2024; a QWHA baseline): sparse high-rank adapter.

A fixed sparse mask of weight positions is chosen once; only those ``p`` entries of ``ΔW`` train
(zero at init), everything else is frozen: ``ΔW = scale · F`` with ``F`` the scatter of ``c`` at the
mask. Mask: ``random`` (SHiRA-Rand; QWHA's description of its SHiRA baseline) or ``magnitude``
(SHiRA-WM: the largest ``|W0|``). It is QWHA's layer with no transform (``transform="none"``).

On QWHA's integer base with QWHA's budget ``p = r·(d_in + d_out)`` and α in QWHA's units: each
coefficient moves one weight by ``α/√(d_in·d_out)`` (the Frobenius norm of a QWHA coefficient's
basis vector with ``alpha_semantics=code``). Not on the grid: deployed = integer base + fp sparse adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..quant import QuantWeight
from . import register
from .base import MethodConfig
from .qwha import SparseBaseline, SparseSpectralLinear, _random_mask, _top_mask, budget

MASKS = ("random", "magnitude")


@dataclass
class SHiRAConfig(MethodConfig):
    rank: int = 8  # budget p = rank·(d_in + d_out) per layer (QWHA's rule)
    alpha: float = 4000.0  # ΔW = α/√(d_in·d_out) · F (see the module docstring)
    mask: str = "random"  # random (SHiRA-Rand) | magnitude (SHiRA-WM, largest |W0|)

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"method.rank={self.rank} must be positive")
        if self.mask not in MASKS:
            raise ValueError(f"method.mask={self.mask!r} is not valid; choose one of: {', '.join(MASKS)}")


class SHiRALinear(SparseSpectralLinear):
    """Frozen integer base + ``p`` trainable weight deltas at a fixed mask (zero init)."""


@register
class SHiRA(SparseBaseline):
    name = "shira"
    Config = SHiRAConfig

    def layer(self, name: str, linear: nn.Linear, qw: QuantWeight | None) -> nn.Module:
        p = budget(self.cfg.rank, name, linear)
        w0 = linear.weight.detach()
        if self.cfg.mask == "random":
            mask = _random_mask(tuple(w0.shape), p, None, w0.device)
        else:
            mask = _top_mask(w0.float().abs(), p)
        idx = mask.flatten().nonzero().squeeze(1)
        # transform "none" is T = √d_in·I, so ΔW = scale·F/√d_in: scale = α/√d_out gives α/√(d_in·d_out)
        scale = self.cfg.alpha / math.sqrt(w0.shape[0])
        c = torch.zeros(p, dtype=torch.float32, device=w0.device)
        return SHiRALinear(qw, linear.bias, idx, c, scale, "none")
