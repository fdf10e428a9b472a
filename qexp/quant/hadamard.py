"""Fast Walsh–Hadamard transform along the last dimension, for ``n = K · 2^k``, in QWHA's layout.

``H_n = H_K ⊗ H_{2^k}``: a known ``K × K`` Hadamard block (``K = 1`` for powers of two) times a
Sylvester matrix in natural order. This is the matrix of the official QWHA code (``vantaa89/qwha``,
``qhft/hadamard.py``, adapted from QuaRot): its ``wht`` views the input as ``[K, n/K]``, applies
``fast_hadamard_transform`` (Sylvester, ``scipy.linalg.hadamard``) along ``n/K``, then ``had_K``
along ``K``; ``wht(x) = x Hᵀ`` and ``iwht(y) = y H / n``, as here. The blocks are that code's tables
(from Sloane's library), kept as ``+``/``-`` rows in ``hadamard_blocks.csv`` with their sources.
K is the first of :data:`BLOCKS` (the official order) that divides ``n``; ``n/K`` must be a power
of two. One block the official code lacks: K = 148 (Sloane's had.148.will, tabled by PM-KVQ), for
Qwen2.5-7B's 18944 = 148·128, which the official code refuses. 44, for instance, is in neither.

Nothing of size ``n × n`` is ever formed: the ``2^k`` part is applied as ``H_{f1} ⊗ H_{f2} ⊗ …``
with factors of at most 64 (one dense matmul each, ``O(n·Σf)``; two passes for ``n = 4096`` where a
radix-2 butterfly makes 12 strided ones), the ``K`` part a matmul with the ``K × K`` block (``O(n·K)``).

Conventions (row vectors, the layout of ``[d_out, d_in]`` weights):
  * :func:`fwht` ``(x) = x Hᵀ`` (coefficients ``y_k = <x, H_k>``, unnormalized);
  * :func:`ifwht` ``(y) = y H / n``, its exact inverse (``H Hᵀ = n I``). Most blocks are not
    symmetric, so the inverse uses the transpose of the block, not the block.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from torch import Tensor

# Block orders, in the official code's order of precedence (172 first; 40 before 20, so that
# 20·2^k with k ≥ 1 uses had_40). 148 is the one addition; its odd part 37 is no other block's.
BLOCKS = (172, 156, 148, 140, 108, 60, 52, 36, 28, 40, 20, 12)
NOT_OFFICIAL = (148,)
_DATA = Path(__file__).with_name("hadamard_blocks.csv")


@cache
def _rows() -> dict[int, tuple[str, ...]]:
    """``K -> rows`` of ``hadamard_blocks.csv`` (``'+'``/``'-'`` strings)."""
    rows: dict[int, list[str]] = {}
    for line in _DATA.read_text().splitlines():
        if line and not line.startswith("#"):
            k, row = line.split(",")
            rows.setdefault(int(k), []).append(row)
    return {k: tuple(r) for k, r in rows.items()}


@cache
def _block(m: int, dtype: torch.dtype, device: torch.device | None) -> Tensor:
    if m == 1:
        return torch.ones(1, 1, dtype=dtype, device=device)
    if m not in BLOCKS:
        raise ValueError(f"Hadamard block size {m} is not supported; supported: {sorted(BLOCKS)}")
    return torch.tensor([[1.0 if c == "+" else -1.0 for c in r] for r in _rows()[m]], dtype=dtype, device=device)


def hadamard_small(m: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """The ``m × m`` ±1 block ``H_m`` with ``H_m H_mᵀ = m I`` (m = 1 or in :data:`BLOCKS`)."""
    return _block(m, dtype, None if device is None else torch.device(device)).clone()


def factor(n: int) -> tuple[int, int]:
    """``(2^k, K)`` with ``n = K · 2^k``: K the first of :data:`BLOCKS` dividing n (else 1); raises if
    ``n/K`` is not a power of two."""
    m = next((b for b in BLOCKS if n % b == 0), 1)
    a = n // m
    if a <= 0 or a & (a - 1):
        raise ValueError(f"Walsh–Hadamard size n={n} is not supported: need n = K·2^k with K = 1 or a known "
                         f"Hadamard block, K in {sorted(BLOCKS)} (the official QWHA/QuaRot tables, plus 148)")
    return a, m


def hadamard_dense(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The dense ``H_K ⊗ H_{2^k}`` (tests and small checks only; the transforms never build it)."""
    a, m = factor(n)
    return torch.kron(hadamard_small(m, dtype), _sylvester(a, dtype, torch.device("cpu")))


BLOCK = 64  # the largest Sylvester factor applied as one matmul


def _sylvester_factors(a: int) -> list[int]:
    """``a = 2^k`` as near-equal powers of two ≤ :data:`BLOCK` (``H_a = H_{f1} ⊗ H_{f2} ⊗ …``)."""
    k = a.bit_length() - 1
    parts = -(-k // (BLOCK.bit_length() - 1)) if k else 0
    return [2 ** (k // parts + (i < k % parts)) for i in range(parts)]


@cache
def _sylvester(f: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < f:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@torch.no_grad()
def _transform(x: Tensor, transpose: bool, scale: float) -> Tensor:
    """``scale · x Hᵀ`` (``transpose``) or ``scale · x H`` along the last dim, ``H = H_K ⊗ H_{2^k}``."""
    n = x.shape[-1]
    a, m = factor(n)
    # The 2^k axis (the fast one, index i mod 2^k): H_{2^k} = H_{f1} ⊗ H_{f2} ⊗ … (Sylvester, natural
    # order, symmetric), one matmul with each small ±1 factor along its own axis. The same sums as a
    # radix-2 butterfly, in two or three dense passes instead of k strided ones (~2.3x faster at 4096).
    y = x.reshape(-1, a)
    done = 1
    for f in _sylvester_factors(a):
        h = _sylvester(f, y.dtype, y.device)
        rest = a // (done * f)
        y = y.reshape(-1, f) @ h if rest == 1 else torch.matmul(h, y.reshape(-1, f, rest))
        done *= f
    # The K axis (index i // 2^k), with the scale: y_K ← H_K y_K (x Hᵀ) or H_Kᵀ y_K (x H).
    if m > 1:
        hm = _block(m, y.dtype, y.device)
        y = torch.matmul((hm if transpose else hm.T) * scale, y.reshape(-1, m, a))
    elif scale != 1.0:
        y = y * scale
    y = y.reshape(x.shape)
    return y.clone() if y.data_ptr() == x.data_ptr() else y


class _WHT(torch.autograd.Function):
    """``scale · x Hᵀ`` or ``scale · x H``; linear, so the backward is the other one."""

    @staticmethod
    def forward(ctx, x: Tensor, transpose: bool, scale: float) -> Tensor:
        ctx.transpose, ctx.scale = transpose, scale
        return _transform(x, transpose, scale)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None]:
        return _WHT.apply(g, not ctx.transpose, ctx.scale), None, None


def fwht(x: Tensor) -> Tensor:
    """``x Hᵀ`` along the last dim (unnormalized ±1 transform), ``O(n log n)``; differentiable."""
    return _WHT.apply(x, True, 1.0)


def ifwht(y: Tensor) -> Tensor:
    """``y H / n``: the exact inverse of :func:`fwht` (carries the ``1/n``); differentiable."""
    return _WHT.apply(y, False, 1.0 / y.shape[-1])
