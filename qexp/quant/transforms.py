"""Fast real transforms for sparse spectral adapters (QWHA, its Table 4 ablations, SSH, LoCA).

Every transform ``T`` (``n × n``) is used in QWHA's scaling: ``T Tᵀ = n I``, so
:func:`forward` ``(x) = x Tᵀ`` gives unnormalized coefficients and :func:`inverse`
``(y) = y T / n`` is its exact inverse. With that one convention the adapters' coefficient
magnitudes, and so their learning rates, are comparable whichever transform is chosen:

* ``wht``: ``T = H_K ⊗ H_{2^k}`` (:mod:`.hadamard`, QWHA's basis; ``n = K·2^k`` only);
* ``dct``: ``T = √n · C`` with ``C`` the orthonormal DCT-II (LoCA's basis);
* ``dht``: ``T = cas`` with ``cas_kj = cos(2πkj/n) + sin(2πkj/n)`` (SSH's basis; symmetric,
  ``cas² = n I``, so the Hartley transform is its own inverse up to ``1/n``);
* ``none``: ``T = √n · I`` (a plain sparse adapter, no transform).

DCT and DHT run through ``torch.fft`` (``O(n log n)`` for every length, no dense matrix): any
width works, so they need no size check. They compute in fp32 (fp64 for fp64 input); ``torch.fft``
has no bf16 kernels. Each is linear and differentiable (autograd through ``torch.fft``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .hadamard import factor, fwht, ifwht

TRANSFORMS = ("wht", "dct", "dht", "none")


def _fft_dtype(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def dht(x: Tensor) -> Tensor:
    """Unnormalized discrete Hartley transform along the last dim: ``x cas`` (``cas`` symmetric)."""
    f = torch.fft.fft(_fft_dtype(x), dim=-1)
    return f.real - f.imag  # Σ x_j (cos + sin)(2πkj/n): fft's imaginary part is −Σ x_j sin


def _dct_weights(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Per-frequency orthonormal DCT-II scale ``s_k`` (``√(1/n)`` at k = 0, else ``√(2/n)``)."""
    s = torch.full((n,), math.sqrt(2.0 / n), dtype=dtype, device=device)
    s[0] = math.sqrt(1.0 / n)
    return s


def _twiddle(n: int, sign: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    k = torch.arange(n, dtype=dtype, device=device)
    return torch.polar(torch.ones_like(k), sign * math.pi * k / (2 * n))


def dct(x: Tensor) -> Tensor:
    """Orthonormal DCT-II along the last dim (``x Cᵀ``), by one FFT of the even/odd reordering
    (Makhoul 1980): with ``v = (x_0, x_2, …, x_3, x_1)``, ``X_k = Re(e^{-iπk/2n} FFT(v)_k)``."""
    x = _fft_dtype(x)
    n = x.shape[-1]
    v = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1)
    X = (torch.fft.fft(v, dim=-1) * _twiddle(n, -1.0, x.dtype, x.device)).real
    return X * _dct_weights(n, x.dtype, x.device)


def idct(y: Tensor) -> Tensor:
    """Inverse of :func:`dct` (``y C``): ``W_k = X_k − i X_{n−k}`` undoes the real part, then one
    inverse FFT gives ``v`` and the reordering is undone."""
    y = _fft_dtype(y)
    n = y.shape[-1]
    X = y / _dct_weights(n, y.dtype, y.device)
    rev = torch.cat([torch.zeros_like(X[..., :1]), X[..., 1:].flip(-1)], dim=-1)  # X_{n−k}, X_n = 0
    V = torch.complex(X, -rev) * _twiddle(n, 1.0, y.dtype, y.device)
    v = torch.fft.ifft(V, dim=-1).real
    half = (n + 1) // 2
    out = torch.empty_like(v)
    out[..., ::2] = v[..., :half]
    out[..., 1::2] = v[..., half:].flip(-1)
    return out


def check(name: str, n: int) -> None:
    """Raise if ``name`` is not a transform or cannot handle size ``n`` (only the WHT has limits)."""
    if name not in TRANSFORMS:
        raise ValueError(f"transform={name!r} is not valid; choose one of: {', '.join(TRANSFORMS)}")
    if name == "wht":
        factor(n)


def forward(x: Tensor, name: str) -> Tensor:
    """``x Tᵀ`` along the last dim (coefficients; ``T Tᵀ = n I``)."""
    n = x.shape[-1]
    if name == "wht":
        return fwht(x)
    if name == "dct":
        return dct(x) * math.sqrt(n)
    if name == "dht":
        return dht(x)
    if name == "none":
        return x * math.sqrt(n)
    check(name, n)
    raise AssertionError


def inverse(y: Tensor, name: str) -> Tensor:
    """``y T / n``: the exact inverse of :func:`forward` along the last dim."""
    n = y.shape[-1]
    if name == "wht":
        return ifwht(y)
    if name == "dct":
        return idct(y) / math.sqrt(n)
    if name == "dht":
        return dht(y) / n
    if name == "none":
        return y / math.sqrt(n)
    check(name, n)
    raise AssertionError


def inverse2d(y: Tensor, name: str) -> Tensor:
    """Inverse along both dims of a ``[d_out, d_in]`` matrix (FourierFT/LoCA/SSH's 2-D update)."""
    return inverse(inverse(y, name).transpose(-1, -2), name).transpose(-1, -2)


def forward2d(x: Tensor, name: str) -> Tensor:
    """Forward along both dims (the 2-D spectrum of a weight matrix)."""
    return forward(forward(x, name).transpose(-1, -2), name).transpose(-1, -2)
