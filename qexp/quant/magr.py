"""MagR (Zhang et al., NeurIPS 2024): weight-magnitude reduction, a preprocessing stage of the base.

Per target linear with calibration inputs ``X``, MagR replaces ``W`` by the solution of the
ℓ∞-regularised least squares

    min_W'  ½‖X (W' − W)ᵀ‖_F² + α Σ_{rows, groups} ‖W'_{row, group}‖_∞

(the group being the quantization group, or the whole row for per-channel grids), by proximal
gradient descent: ``XᵀX`` is normalised by its largest eigenvalue (so step 1 is safe) and each of
``iters`` steps takes ``W' ← prox_{α‖·‖∞}(W' − (W' − W) XᵀX)``. The prox of the ℓ∞ norm follows from
Moreau's identity: ``prox(v) = v − α·P_{‖·‖₁ ≤ 1}(v/α)``, with the Euclidean projection onto the
ℓ1 ball of Duchi et al. (2008). The layer output barely moves (``X`` keeps ``W'`` close to ``W``
along its range) while the largest weights shrink, so the grid that RTN or GPTQ fits is finer.

Defaults from the MagR paper/README: α = 1e-4 per group (1e-3 per channel), 200 iterations. As in
QWHA's released quantization script, it runs before GPTQ (``quant.init=gptq quant.magr=true``).
``XᵀX`` comes from the fp model's calibration activations, one block at a time (the model stops
after the block being processed): the MagR weights never feed the next block's inputs.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import suppress
from pathlib import Path

import torch
from torch import Tensor, nn

from .gptq import CALIB_BATCH, _block_list, _Hessians, _Stop, hash_inputs, save_atomic
from .grid import QuantSpec

log = logging.getLogger(__name__)


def project_l1_ball(v: Tensor, radius: float = 1.0) -> Tensor:
    """Row-wise Euclidean projection of ``v [n, m]`` onto ``{u : ‖u‖₁ ≤ radius}`` (Duchi et al. 2008)."""
    a = v.abs()
    inside = a.sum(1, keepdim=True) <= radius
    mu = torch.sort(a, dim=1, descending=True).values
    csum = mu.cumsum(1) - radius
    j = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=v.dtype)
    rho = ((mu * j) > csum).to(v.dtype).mul(j).argmax(1, keepdim=True)  # last j with μ_j > (Σ_{≤j} μ − r)/j
    theta = csum.gather(1, rho) / (rho + 1).to(v.dtype)
    return torch.where(inside, v, torch.sign(v) * (a - theta).clamp(min=0))


def prox_linf(v: Tensor, alpha: float, group: int) -> Tensor:
    """``prox_{α‖·‖∞}`` of every ``group``-wide slice of each row of ``v [d_out, d_in]``."""
    g = v.reshape(-1, group)
    return (g - alpha * project_l1_ball(g / alpha)).reshape(v.shape)


def top_eigenvalue(h: Tensor) -> Tensor:
    """The largest eigenvalue of the symmetric ``h`` (fp64 ``eigvalsh``, as fp32)."""
    return torch.linalg.eigvalsh(h.double())[-1].float()


@torch.no_grad()
def magr(w: Tensor, xtx: Tensor, group_size: int, alpha: float = 1e-4, iters: int = 200) -> Tensor:
    """The MagR weight for ``w [d_out, d_in]`` given ``xtx = XᵀX`` (any positive scale); fp32."""
    w0 = w.detach().float()
    h = xtx.detach().float()
    top = top_eigenvalue(h)
    if not torch.isfinite(top) or top <= 0:
        return w0.clone()
    h = h / top
    group = w0.shape[1] if group_size == -1 else group_size
    out = w0.clone()
    for _ in range(iters):
        out = prox_linf(out - (out - w0) @ h, alpha, group)
    return out


def _stop(*_) -> None:
    raise _Stop


@torch.no_grad()
def magr_weights(spec: QuantSpec, model: nn.Module, targets: dict[str, nn.Linear], calib_ids: Tensor,
                 alpha: float, iters: int) -> dict[str, Tensor]:
    """The MagR weight of every target (in its weight's dtype), from the fp model's activations on
    ``calib_ids``: per decoder block, a forward that stops after that block collects its targets'
    ``XᵀX`` (one block's Hessians in memory at a time); without a block list, one pass for all."""
    found = _block_list(model, list(targets))
    if found is None:
        groups = [(None, list(targets))]
    else:
        list_name, blocks = found
        groups = [(block, [n for n in targets if n.startswith(f"{list_name}.{i}.")]) for i, block in enumerate(blocks)]
    calib_ids = calib_ids.to(next(model.parameters()).device)
    out: dict[str, Tensor] = {}
    for block, names in groups:
        if not names:
            continue
        hooks = _Hessians({n: targets[n] for n in names})
        stop = block.register_forward_hook(_stop) if block is not None else None
        try:
            for batch in calib_ids.split(CALIB_BATCH):
                with suppress(_Stop):
                    model(input_ids=batch, use_cache=False)
        finally:
            if stop is not None:
                stop.remove()
            hessians = hooks.close()
        for n in names:
            w = targets[n].weight
            h = hessians[n]
            out[n] = w.detach().clone() if h is None else magr(w, h, spec.group_size, alpha, iters).to(w.dtype)
    return out


def cache_key(spec: QuantSpec, targets: dict[str, nn.Linear], calib_ids: Tensor, alpha: float, iters: int) -> str:
    """Hash of what the MagR weights depend on: this module's and the Hessian code (gptq.py), α, the
    iterations, the group (not the bits: one MagR result serves every bit width), every target's name
    and weight bytes, and the calibration token ids."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update((Path(__file__).parent / "gptq.py").read_bytes())
    h.update(repr((float(alpha), int(iters), spec.group_size)).encode())
    hash_inputs(h, targets, calib_ids)
    return h.hexdigest()[:20]


def magr_cached(spec: QuantSpec, model: nn.Module, targets: dict[str, nn.Linear], calib_ids: Tensor,
                alpha: float, iters: int, cache_dir: Path | None = None) -> dict[str, Tensor]:
    """:func:`magr_weights`, kept in ``cache_dir/magr-<key>.pt`` (written atomically) and reused by any
    later cell with the same :func:`cache_key` (e.g. the same base at 2, 3 and 4 bits)."""
    if cache_dir is None:
        return magr_weights(spec, model, targets, calib_ids, alpha, iters)
    path = Path(cache_dir) / f"magr-{cache_key(spec, targets, calib_ids, alpha, iters)}.pt"
    if path.exists():
        log.info("MagR weights from cache %s", path)
        saved = torch.load(path, map_location=next(model.parameters()).device)
        return {n: saved[n] for n in targets}
    out = magr_weights(spec, model, targets, calib_ids, alpha, iters)
    save_atomic(out, path)
    log.info("MagR weights cached in %s", path)
    return out
