"""Fast Walsh–Hadamard transform along the last dimension, for ``n = 2^k · m``.

``H_n = H_{2^k} ⊗ H_m``: a Sylvester matrix (natural order) times a small Hadamard block built
here by Paley's constructions (Paley I: ``m = q + 1``, ``q ≡ 3 mod 4``; Paley II:
``m = 2(q + 1)``, ``q ≡ 1 mod 4``; ``q`` a prime or a prime square). Nothing of size ``n × n`` is
ever formed: the ``2^k`` part is applied as ``H_{f1} ⊗ H_{f2} ⊗ …`` with factors of at most 64
(one dense matmul each, ``O(n·Σf)``; two passes for ``n = 4096`` where a radix-2 butterfly makes 12
strided ones), the ``m`` part a matmul with the ``m × m`` block (``O(n·m)``).

Conventions (row vectors, the layout of ``[d_out, d_in]`` weights):
  * :func:`fwht` ``(x) = x Hᵀ`` (coefficients ``y_k = <x, H_k>``, unnormalized);
  * :func:`ifwht` ``(y) = y H / n``, its exact inverse (``H Hᵀ = n I``). The small blocks of size
    12 and 20 are not symmetric, so the inverse uses the transpose of the block, not the block.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

# Small blocks this module can build (n = 2^k · m). 40 = 2·20 comes for free; QWHA's 156 and 172
# have no Paley construction (they need Williamson-type matrices) and are refused.
SMALL = (1, 12, 20, 28, 36, 52, 60, 108, 140)


def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, e)`` with ``q = p^e`` for an odd prime ``p`` and ``e ∈ {1, 2}``, else None."""
    for e in (1, 2):
        p = round(q ** (1 / e))
        if p**e == q and p > 2 and all(p % d for d in range(2, int(p**0.5) + 1)):
            return p, e
    return None


def _quadratic_character(q: int) -> list[list[int]]:
    """Jacobsthal matrix ``Q_ab = χ(a - b)`` over GF(q) (q = p or p²)."""
    p, e = _prime_power(q)  # type: ignore[misc]
    if e == 1:
        elems = [(a, 0) for a in range(p)]
        ns = 0
    else:  # GF(p²) = GF(p)[α]/(α² - ns) with ns a quadratic non-residue mod p
        ns = next(a for a in range(2, p) if pow(a, (p - 1) // 2, p) == p - 1)
        elems = [(a, b) for a in range(p) for b in range(p)]

    def mul(x: tuple[int, int], y: tuple[int, int]) -> tuple[int, int]:
        return ((x[0] * y[0] + ns * x[1] * y[1]) % p, (x[0] * y[1] + x[1] * y[0]) % p)

    squares = {mul(x, x) for x in elems if x != (0, 0)}

    def chi(x: tuple[int, int]) -> int:
        return 0 if x == (0, 0) else (1 if x in squares else -1)

    return [[chi(((a[0] - b[0]) % p, (a[1] - b[1]) % p)) for b in elems] for a in elems]


@cache
def _small_list(m: int) -> tuple[tuple[int, ...], ...]:
    if m == 1:
        return ((1,),)
    if _prime_power(m - 1) and (m - 1) % 4 == 3:  # Paley I: H = I + [[0, 1ᵀ], [-1, Q]]
        q = m - 1
        jac = _quadratic_character(q)
        s = [[0] + [1] * q] + [[-1, *row] for row in jac]
        return tuple(tuple(s[i][j] + (i == j) for j in range(m)) for i in range(m))
    if m % 2 == 0 and _prime_power(m // 2 - 1) and (m // 2 - 1) % 4 == 1:  # Paley II
        q = m // 2 - 1
        jac = _quadratic_character(q)
        s = [[0] + [1] * q] + [[1, *row] for row in jac]
        zero_block, one_block = ((1, -1), (-1, -1)), ((1, 1), (1, -1))
        rows = []
        for i in range(q + 1):
            for a in range(2):
                row: list[int] = []
                for j in range(q + 1):
                    blk = zero_block if s[i][j] == 0 else one_block
                    row += [s[i][j] * v if s[i][j] else v for v in blk[a]]
                rows.append(tuple(row))
        return tuple(rows)
    raise ValueError(f"no Paley construction for a Hadamard block of size {m}; supported: {SMALL}")


def hadamard_small(m: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """The ``m × m`` ±1 block ``H_m`` with ``H_m H_mᵀ = m I`` (m in :data:`SMALL`)."""
    if m not in SMALL:
        raise ValueError(f"Hadamard block size {m} is not supported; supported: {SMALL}")
    return torch.tensor(_small_list(m), dtype=dtype, device=device)


def factor(n: int) -> tuple[int, int]:
    """``(2^k, m)`` with ``n = 2^k · m`` and ``m`` the smallest supported block; raises otherwise."""
    for m in SMALL:
        a = n // m
        if n % m == 0 and a > 0 and a & (a - 1) == 0:
            return a, m
    raise ValueError(f"Walsh–Hadamard size n={n} is not supported: need n = 2^k · m with m in {SMALL} "
                     "(156 and 172 have no Paley construction here)")


def hadamard_dense(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The dense ``H_{2^k} ⊗ H_m`` (tests and small checks only; the transforms never build it)."""
    a, m = factor(n)
    h = torch.ones(1, 1, dtype=dtype)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=dtype)
    while h.shape[0] < a:
        h = torch.kron(h2, h)
    return torch.kron(h, hadamard_small(m, dtype))


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
    """``scale · x Hᵀ`` (``transpose``) or ``scale · x H`` along the last dim."""
    n = x.shape[-1]
    a, m = factor(n)
    y = x.reshape(-1, a, m)
    if m > 1:  # the small block (and the scale) as one matmul: rows times H_mᵀ or H_m
        hm = hadamard_small(m, x.dtype, x.device)
        y = y @ ((hm.T if transpose else hm) * scale)
    elif scale != 1.0:
        y = y * scale
    # The 2^k axis: H_{2^k} = H_{f1} ⊗ H_{f2} ⊗ … (Sylvester, natural order, symmetric), one matmul
    # with each small ±1 factor along its own axis. The same sums as a radix-2 butterfly, in two
    # or three dense passes instead of k strided ones (k = 12 for 4096: ~2.3x faster on one CPU core).
    done = 1
    for f in _sylvester_factors(a):
        h = _sylvester(f, y.dtype, y.device)
        rest = (a // (done * f)) * m
        y = y.reshape(-1, f) @ h if rest == 1 else torch.matmul(h, y.reshape(-1, f, rest))
        done *= f
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
