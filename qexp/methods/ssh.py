"""SSH (Shen et al., 2025; a QWHA baseline): sparse spectrum adaptation in the discrete Hartley domain.

``ΔW = α · iDHT₂(F)``: a sparse ``[d_out, d_in]`` coefficient matrix ``F`` (``p`` trainable values
``c``, zero at init, at fixed locations), mapped to a dense update by the 2-D inverse Hartley
transform (along both dims, as FourierFT-style adapters do; QWHA's point is that it needs only
one). Locations: half the budget at the largest-magnitude entries of the pretrained weight's 2-D
Hartley spectrum, half drawn at random among the rest (``random_fraction``).

On QWHA's integer base (``W_Q``, RTN or GPTQ) with QWHA's budget ``p = r·(d_in + d_out)`` and α in
QWHA's units (:mod:`qexp.quant.transforms`: each coefficient's basis matrix has Frobenius norm
``α/√(d_in·d_out)``, as a QWHA coefficient's with ``alpha_semantics=code``), so one lr means the
same step for every sparse adapter. Not on the grid: deployed = integer base + fp sparse adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..quant import QuantWeight
from ..quant import transforms as T
from . import register
from .base import MethodConfig
from .qwha import SparseBaseline, SparseSpectralLinear, _random_mask, _top_mask, budget


@dataclass
class SSHConfig(MethodConfig):
    rank: int = 8  # budget p = rank·(d_in + d_out) per layer (QWHA's rule)
    alpha: float = 4000.0  # ΔW = α·iDHT₂(F) in QWHA's units (see the module docstring)
    random_fraction: float = 0.5  # share of the budget drawn at random (SSH: half)

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"method.rank={self.rank} must be positive")
        if not 0.0 <= self.random_fraction <= 1.0:
            raise ValueError(f"method.random_fraction={self.random_fraction} must be in [0, 1]")


class SSHLinear(SparseSpectralLinear):
    """Frozen integer base + sparse 2-D Hartley coefficients (zero init)."""


def ssh_locations(w0: Tensor, p: int, random_fraction: float, generator: torch.Generator | None = None) -> Tensor:
    """Flat indices of ``p`` locations: the largest ``|DHT₂(W0)|`` entries, plus ``round(p·random_fraction)``
    drawn uniformly from the others."""
    n_rand = round(p * random_fraction)
    spectrum = T.forward2d(w0.double(), "dht")
    mask = _random_mask(tuple(w0.shape), n_rand, generator, w0.device, _top_mask(spectrum.abs(), p - n_rand))
    return mask.flatten().nonzero().squeeze(1)


@register
class SSH(SparseBaseline):
    name = "ssh"
    Config = SSHConfig

    def layer(self, name: str, linear: nn.Linear, qw: QuantWeight | None) -> nn.Module:
        p = budget(self.cfg.rank, name, linear)
        idx = ssh_locations(linear.weight.detach(), p, self.cfg.random_fraction)
        c = torch.zeros(p, dtype=torch.float32, device=linear.weight.device)  # fp32 coefficients, zero init
        return SSHLinear(qw, linear.bias, idx, c, self.cfg.alpha, "dht", two_d=True)
