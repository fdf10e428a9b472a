"""IR-QLoRA's ICQ (Qin et al., ICML 2024), information calibration quantization: per quantization
group a shift ``τ`` chosen to maximise the entropy of the integer codes; a range choice of the RTN
base (``quant.range=icq``, ``quant.init=rtn``).

Per group ``w``: ``τ₀ = median(w)``, ``m = max|w − τ₀|``, candidates ``τ = τ₀ + f·m`` with ``f`` on
``2n+1`` points of ``[−λσ, λσ]`` (the released script's λ = 0.1, n = 100 and ``σ = 1/Φ⁻¹(0.9677)``, the
NormalFloat spacing). Each candidate quantizes ``w − τ`` on the configured grid (min-max range of
``w − τ``); the one whose codes have the largest entropy ``H = −Σ p_k log₂ p_k`` wins (ties: the
first). The group then deploys as ``w ≈ s·(c − z) + τ = s·(c − z')`` with the float zero point
``z' = z − τ/s`` (the released code stores ``τ`` in 8 bits beside the NF4 absmax; here it is exact
in ``z'``). On an asymmetric min-max grid a shift barely changes the codes (the range moves with
it), so IR-QLoRA's setting is the symmetric (absmax) grid, as NF4 is: ``irqlora`` sets ``quant.sym=true``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .grid import QuantSpec, QuantWeight, grouped
from .rtn import _range_to_grid

TAU_RANGE = 0.1  # λ
TAU_N = 100  # 2n+1 candidates (the released fine-tuning script: tau_n 100)
SIGMA = float(1 / torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.9677083)))


def _entropy(g: Tensor, spec: QuantSpec) -> Tensor:
    """Entropy in bits of each row of grouped codes ``g [..., n_groups, g]`` (float integers)."""
    levels = spec.qmax - spec.qmin + 1
    rows = g.shape[:-1].numel()
    idx = (g - spec.qmin).long().reshape(rows, -1) + levels * torch.arange(rows, device=g.device).unsqueeze(1)
    p = torch.bincount(idx.reshape(-1), minlength=rows * levels).reshape(*g.shape[:-1], levels) / g.shape[-1]
    return -(p * torch.log2(p.clamp(min=1e-30))).sum(-1)


def code_entropy(codes: Tensor, spec: QuantSpec) -> Tensor:
    """Entropy in bits of the codes of each group ``[d_out, n_groups]`` (``codes [d_out, d_in]``)."""
    return _entropy(grouped(codes.float(), spec.group_size), spec)


def _codes(v: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor, Tensor]:
    """Min-max grid of grouped ``v [d_out, G, g]`` and its codes."""
    scale, zero = _range_to_grid(v.amin(-1).clamp(max=0), v.amax(-1).clamp(min=0), spec)
    codes = torch.round(v / scale.unsqueeze(-1)).add_(zero.unsqueeze(-1)).clamp_(spec.qmin, spec.qmax)
    return codes, scale, zero


@torch.no_grad()
def icq(w: Tensor, spec: QuantSpec, tau_range: float = TAU_RANGE, n: int = TAU_N) -> QuantWeight:
    """ICQ-quantize ``w [d_out, d_in]`` (see the module docstring)."""
    spec.groups(w.shape[1])
    wg = grouped(w.detach().float(), spec.group_size)
    tau0 = wg.median(-1).values
    m = (wg - tau0.unsqueeze(-1)).abs().amax(-1)
    best_h, best_tau = torch.full_like(tau0, -1.0), tau0.clone()
    for f in torch.linspace(-tau_range * SIGMA, tau_range * SIGMA, 2 * n + 1).tolist():
        tau = tau0 + f * m
        h = _entropy(_codes(wg - tau.unsqueeze(-1), spec)[0], spec)
        better = h > best_h
        best_h, best_tau = torch.where(better, h, best_h), torch.where(better, tau, best_tau)
    codes, scale, zero = _codes(wg - best_tau.unsqueeze(-1), spec)
    return QuantWeight(codes.reshape(w.shape), scale, zero - best_tau / scale, spec)
