"""GPTQ (Frantar et al., 2023): column-by-column rounding with second-order error feedback.

For one linear ``y = x Wᵀ`` with calibration inputs ``X`` the layer-output error
``‖XWᵀ − XŴᵀ‖²`` has Hessian ``H = 2XᵀX`` (w.r.t. each row of ``W``). GPTQ quantizes the
input columns one at a time and spreads each column's rounding error over the columns not
yet quantized, using the upper Cholesky factor ``U`` of ``H⁻¹`` (``H`` damped by
``damp·mean(diag H)``): ``err = (w_i − q_i)/U_ii``, ``W[:, j>i] −= err·U[i, j>i]``. Updates
are applied lazily per block of columns (a block always holds whole groups).

Group scales/zeros are computed *on the fly* from the already-updated weights when the
first column of a group is reached (the grid range is the same ``minmax`` / ``lp`` choice as
RTN, asymmetric or symmetric per the spec). With ``act_order`` the columns are visited in
order of decreasing ``diag H``; the groups then stay **static**: contiguous in the original
column order, their scales/zeros computed up front from the unmodified weights, so the
result keeps the ``[d_out, n_groups]`` layout of every other :class:`QuantWeight` (no
``g_idx``). ``group_size=-1`` (per channel) also computes its one range up front.

Calibration (:func:`gptq_quantizer`) is *block-sequential*: the decoder blocks (the
``nn.ModuleList`` holding the targets) are processed in order; each block's Hessians are
collected from inputs produced by the already-quantized earlier blocks, all of its target
linears are quantized from one forward of the block (with the block's own weights still fp,
as in the reference implementation without ``--true-sequential``), and the block is then run
with its quantized weights to give the next block's inputs. If no such block list covers all
targets, it falls back to a one-pass variant: Hessians of every target from one forward of
the fp model. The model's weights are restored afterwards; only the ``QuantWeight`` results
are kept. Limitation: the block keyword arguments (attention mask, rotary embeddings) are
captured once at the first block and reused for every block, which holds for models whose
blocks share one mask (Llama, Mistral, Qwen2 without sliding windows).

Memory: the block inputs (all calibration hidden states: 1024 × 2048 tokens of a 4096-wide
model are 17 GB in bf16) wait on the CPU between blocks; one block at a time moves to the
compute ``device`` with one batch of its inputs, and each batch's output replaces its input in
the list. The model may stay on the CPU; each result goes back to where its weight lives.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import QuantConfig
from .grid import QuantSpec, QuantWeight, dequantize, quantize_codes
from .rtn import fit_range, rtn

log = logging.getLogger(__name__)

CALIB_BATCH = 8  # calibration sequences per forward
OFFLOAD = torch.device("cpu")  # where the block inputs wait between blocks


def _range(w: Tensor, spec: QuantSpec, range_method: str, p: float, grid: int) -> tuple[Tensor, Tensor]:
    """Scale and zero ``[d_out]`` for the columns ``w`` (one group)."""
    s, z = fit_range(w, QuantSpec(spec.bits, -1, spec.symmetric), range_method, p, grid)
    return s[:, 0], z[:, 0]


def _inverse_cholesky(h: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹``, ``λ = damp·mean(diag H)`` (raised ×10 if not PD)."""
    lam = damp * h.diagonal().mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(6):
        lower, info = torch.linalg.cholesky_ex(h + lam * eye)
        if info == 0:
            hinv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info == 0:
                return upper
        log.warning("GPTQ: H + %.3g·I is not positive definite (attempt %d); raising the damping", lam, attempt)
        lam = lam * 10 if lam > 0 else torch.tensor(1e-6, dtype=h.dtype, device=h.device)
    raise RuntimeError("GPTQ: Hessian is not positive definite even with 1e5 x damping")


@torch.no_grad()
def gptq(w: Tensor, h: Tensor, spec: QuantSpec, damp: float = 0.01, act_order: bool = False,
         range_method: str = "minmax", p: float = 4.0, grid: int = 100, blocksize: int = 128) -> QuantWeight:
    """Quantize ``w [d_out, d_in]`` given the Hessian ``h = 2XᵀX [d_in, d_in]`` of its inputs."""
    W = w.detach().float().clone()
    d_out, d_in = W.shape
    n_groups = spec.groups(d_in)
    g = spec.group_len(d_in)
    H = h.detach().float().clone()
    dead = H.diagonal() == 0  # inputs that are always 0: their weights do not matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    scale = torch.zeros(d_out, n_groups, device=W.device)
    zero = torch.zeros(d_out, n_groups, device=W.device)
    static = act_order or spec.group_size == -1
    if static:  # ranges fixed up front, groups contiguous in the original column order
        for gi in range(n_groups):
            scale[:, gi], zero[:, gi] = _range(W[:, gi * g:(gi + 1) * g], spec, range_method, p, grid)

    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(d_in, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    U = _inverse_cholesky(H, damp)
    cols = perm.tolist()
    col_spec = QuantSpec(spec.bits, -1, spec.symmetric)
    Q = torch.zeros_like(W)
    block = blocksize if static else g * max(1, blocksize // g)  # on the fly: a group never spans two blocks
    for i1 in range(0, d_in, block):
        i2 = min(i1 + block, d_in)
        W1, E1, U1 = W[:, i1:i2].clone(), torch.zeros(d_out, i2 - i1, device=W.device), U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = cols[i1 + i]
            gi = col // g
            if not static and col % g == 0:  # first column of a group: range of the updated weights
                scale[:, gi], zero[:, gi] = _range(W1[:, i:i + g], spec, range_method, p, grid)
            s, z = scale[:, gi:gi + 1], zero[:, gi:gi + 1]
            q = quantize_codes(W1[:, i:i + 1], s, z, col_spec)
            Q[:, i1 + i] = q[:, 0]
            err = (W1[:, i] - dequantize(q, s, z, -1)[:, 0]) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    codes = torch.empty_like(Q)
    codes[:, perm] = Q
    return QuantWeight(codes, scale, zero, spec)


def _block_list(model: nn.Module, names: list[str]) -> tuple[str, nn.ModuleList] | None:
    """The ``nn.ModuleList`` (decoder blocks) whose elements contain every target, if any."""
    for list_name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod):
            prefixes = [f"{list_name}.{i}." for i in range(len(mod))]
            if all(any(n.startswith(pre) for pre in prefixes) for n in names):
                return list_name, mod
    return None


class _Hessians:
    """Forward hooks accumulating ``Σ xᵀx`` over every token fed to each watched linear."""

    def __init__(self, linears: dict[str, nn.Linear]) -> None:
        self.sums = {n: torch.zeros(m.in_features, m.in_features, device=m.weight.device) for n, m in linears.items()}
        self.tokens = dict.fromkeys(linears, 0)
        self._cache: tuple[Tensor, Tensor, int] | None = None  # q/k/v (gate/up) share one input tensor
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in linears.items()]

    def _hook(self, name: str) -> Callable:
        def hook(mod: nn.Module, args: tuple, out: Tensor) -> None:
            x = args[0]
            if self._cache is None or self._cache[0] is not x:  # holding x: its memory cannot be reused
                x2 = x.detach().reshape(-1, x.shape[-1]).float()
                self._cache = (x, x2.T @ x2, x2.shape[0])
            self.sums[name] += self._cache[1]
            self.tokens[name] += self._cache[2]
        return hook

    def close(self) -> dict[str, Tensor | None]:
        """``H = 2/N Σ xᵀx`` per linear (None for a linear that never ran)."""
        for h in self.handles:
            h.remove()
        self._cache = None
        return {n: (2.0 / self.tokens[n]) * s if self.tokens[n] else None for n, s in self.sums.items()}


class _Stop(Exception):
    pass


def _first_block_inputs(model: nn.Module, first: nn.Module, calib_ids: Tensor,
                        batch: int | None = None) -> list[tuple[tuple, dict]]:
    """``(args, kwargs)`` of the first block for each calibration batch of ``batch`` sequences
    (default :data:`CALIB_BATCH`, read at call time; the model stops there)."""
    batch = batch or CALIB_BATCH
    captured: list[tuple[tuple, dict]] = []

    def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(_to((args, kwargs), OFFLOAD))
        raise _Stop

    handle = first.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for ids in calib_ids.split(batch):
            with suppress(_Stop):
                model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return captured


def _to(x, device: torch.device):
    """``x`` with every tensor in it (also inside tuples, lists and dicts) on ``device``."""
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _with_hidden(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _hidden(out) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _quantize(names: list[str], targets: dict[str, nn.Linear], hessians: dict[str, Tensor | None],
              cfg: QuantConfig, spec: QuantSpec) -> dict[str, QuantWeight]:
    out = {}
    for n in names:
        w = targets[n].weight
        if hessians[n] is None:
            log.warning("GPTQ: %s saw no calibration input; using RTN for it", n)
            out[n] = rtn(w.detach(), spec, cfg.range, cfg.p, cfg.grid)
        else:
            out[n] = gptq(w, hessians[n], spec, cfg.damp, cfg.act_order, cfg.range, cfg.p, cfg.grid)
    return out


def _advance(block: nn.Module, inputs: list[tuple[tuple, dict]], device: torch.device) -> None:
    """Replace each batch's block input by the block's output, in place (no second list)."""
    for j, (args, kwargs) in enumerate(inputs):
        out = _hidden(block(*_to(args, device), **_to(kwargs, device)))
        inputs[j] = _with_hidden(args, kwargs, out.to(OFFLOAD))


@torch.no_grad()
def gptq_results(cfg: QuantConfig, spec: QuantSpec, model: nn.Module, targets: dict[str, nn.Linear],
                 calib_ids: Tensor, sequential: bool = True,
                 device: torch.device | str | None = None) -> dict[str, QuantWeight]:
    """GPTQ every target (block-sequential when the model has a block list, else one fp pass).

    ``device``: where the blocks compute (default: where the model is). The one-pass fallback
    runs the whole model where it is."""
    for n, m in targets.items():
        try:
            spec.groups(m.in_features)
        except ValueError as e:
            raise ValueError(f"{n}: {e}") from None
    home = next(model.parameters()).device
    device = home if device is None else torch.device(device)
    calib_ids = calib_ids.to(home)  # the layers before the first block run where they are
    found = _block_list(model, list(targets)) if sequential else None
    if found is None:
        if sequential:
            log.warning("GPTQ: no block list holds every target; collecting fp Hessians in one pass")
        hooks = _Hessians(targets)
        try:
            for batch in calib_ids.split(CALIB_BATCH):
                model(input_ids=batch, use_cache=False)
        finally:
            hessians = hooks.close()
        return _quantize(list(targets), targets, hessians, cfg, spec)

    list_name, blocks = found
    inputs = _first_block_inputs(model, blocks[0], calib_ids)  # on OFFLOAD
    results: dict[str, QuantWeight] = {}
    for i, block in enumerate(tqdm(blocks, desc=f"GPTQ ({len(calib_ids)} calibration sequences)", leave=False)):
        block_home = next(block.parameters()).device
        block.to(device)
        names = [n for n in targets if n.startswith(f"{list_name}.{i}.")]
        if names:
            hooks = _Hessians({n: targets[n] for n in names})
            try:
                for args, kwargs in inputs:
                    block(*_to(args, device), **_to(kwargs, device))
            finally:
                hessians = hooks.close()
            results.update(_quantize(names, targets, hessians, cfg, spec))
        saved = {n: targets[n].weight.data for n in names}
        try:
            for n in names:  # the next block sees this block's quantized output
                targets[n].weight.data = results[n].dequantize().to(saved[n].dtype)
            if i + 1 < len(blocks):
                _advance(block, inputs, device)
        finally:
            for n in names:
                targets[n].weight.data = saved[n]
        if block_home != device:  # back where the model keeps it, with its results
            block.to(block_home)
            for n in names:
                q = results[n]
                results[n] = QuantWeight(q.codes.to(block_home), q.scale.to(block_home), q.zero.to(block_home), spec)
    return results


def cache_key(cfg: QuantConfig, spec: QuantSpec, targets: dict[str, nn.Linear], calib_ids: Tensor) -> str:
    """Hash of everything a GPTQ result depends on: this module's code, the settings, the grid,
    every target's name and weight bytes, and the calibration token ids."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    settings = {k: getattr(cfg, k) for k in ("sym", "range", "p", "grid", "damp", "act_order")}
    h.update(repr((sorted(settings.items()), spec.bits, spec.group_size, spec.symmetric)).encode())
    hash_inputs(h, targets, calib_ids)
    return h.hexdigest()[:20]


def hash_inputs(h: Any, targets: dict[str, nn.Linear], calib_ids: Tensor) -> None:
    """Add to the hash ``h`` what a calibrated base stage reads: every target's name and weight bytes
    and the calibration token ids (the cache keys of GPTQ and MagR)."""
    for name, linear in targets.items():
        h.update(name.encode())
        h.update(linear.weight.detach().float().cpu().contiguous().numpy().tobytes())
    h.update(calib_ids.cpu().contiguous().numpy().tobytes())


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` through a temporary file, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _cached_results(cfg: QuantConfig, spec: QuantSpec, model: nn.Module, targets: dict[str, nn.Linear],
                    calib_ids: Tensor, cache_dir: Path) -> dict[str, QuantWeight]:
    """:func:`gptq_results`, kept in ``cache_dir/<key>.pt`` (written atomically) and reused."""
    path = Path(cache_dir) / f"{cache_key(cfg, spec, targets, calib_ids)}.pt"
    device = next(model.parameters()).device
    if path.exists():
        log.info("GPTQ base from cache %s", path)
        saved = torch.load(path, map_location=device)
        return {n: QuantWeight(saved[n]["codes"], saved[n]["scale"], saved[n]["zero"], spec) for n in targets}
    results = gptq_results(cfg, spec, model, targets, calib_ids)
    save_atomic({n: {"codes": q.codes, "scale": q.scale, "zero": q.zero} for n, q in results.items()}, path)
    log.info("GPTQ base cached in %s", path)
    return results


def gptq_quantizer(cfg: QuantConfig, spec: QuantSpec, model: nn.Module, targets: dict[str, nn.Linear],
                   calib_ids: Tensor, cache_dir: Path | None = None) -> Callable[[str, nn.Linear], QuantWeight]:
    """Run GPTQ on every target from ``calib_ids [n, seqlen]``; return ``fn(name, linear) -> QuantWeight``.

    With ``cache_dir`` the result is reused by later calls with the same :func:`cache_key`."""
    if cfg.damp < 0 or not math.isfinite(cfg.damp):
        raise ValueError(f"quant.damp={cfg.damp!r}: must be a finite fraction >= 0 (e.g. 0.01)")
    if cache_dir is None:
        results = gptq_results(cfg, spec, model, targets, calib_ids)
    else:
        results = _cached_results(cfg, spec, model, targets, calib_ids, cache_dir)

    def quantize(name: str, linear: nn.Linear) -> QuantWeight:
        if name not in results:
            raise KeyError(f"GPTQ has no result for {name!r}; quantized: {', '.join(results)}")
        return results[name]

    return quantize
