"""What every packed format shares: unsigned codes, integer zero points, and the weight error
that storing scales / zero points in a format's dtypes causes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from torch import Tensor

from ..quant import QuantSpec, QuantWeight
from ..quant.grid import grouped


class ExportError(ValueError):
    """An export that cannot be written as asked; the message says why and what to do."""


def pack(values: Tensor, bits: int, dim: int) -> Tensor:
    """Pack unsigned ``values`` in ``[0, 2^bits)`` along ``dim`` into int32 words with
    compressed-tensors' ``pack_to_int32``: value ``i`` at bit ``i·b`` of a little-endian stream,
    straddling words where needed (2/4/8 bits: ``32/b`` values per word; 3 bits: GPTQ's
    32-values-in-3-words layout). Whole words only: every format here needs them."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits}: packing supports 1..8 bits")
    n = values.shape[dim]
    if (n * bits) % 32:
        raise ValueError(f"{n} values of {bits} bits do not fill whole int32 words (need a multiple of "
                         f"{32 // math.gcd(32, bits)})")
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 1 << bits):
        raise ValueError(f"values span [{int(values.min())}, {int(values.max())}], outside [0, {(1 << bits) - 1}]")
    signed = (values.to(torch.int32) - (1 << (bits - 1))).to(torch.int8)  # the library's offset convention
    return pack_to_int32(signed, bits, packed_dim=dim).contiguous()


def unpack(words: Tensor, bits: int, dim: int, n: int) -> Tensor:
    """Inverse of :func:`pack`: ``n`` unsigned values per line along ``dim`` (int64)."""
    shape = list(words.shape)
    shape[dim] = n
    return unpack_from_int32(words, bits, torch.Size(shape), packed_dim=dim).to(torch.int64) + (1 << (bits - 1))


def check_words(fmt: str, name: str, d_out: int, d_in: int, bits: int, hint: str = "") -> None:
    """Both dims of a linear must fill whole int32 words at ``bits`` (every packed format packs one
    dim of the codes and the other of the zero points)."""
    for what, n in (("in_features", d_in), ("out_features", d_out)):
        if (n * bits) % 32:
            raise ExportError(f"{fmt}: {name}.{what}={n} times bits={bits} is not a multiple of 32{hint}")


def unsigned(codes: Tensor, zero: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Codes in ``[0, 2^b-1]`` and the matching float zero: ``(c - z) = (u - z_u)`` exactly.

    Signed symmetric codes (LR-QAT, L4Q) shift by ``2^(b-1)``: ``u = c + 2^(b-1)``,
    ``z_u = z + 2^(b-1)``; unsigned codes are unchanged."""
    shift = -spec.qmin
    return codes.to(torch.int64) + shift, zero.float() + shift


def integer_zeros(z_u: Tensor, bits: int) -> tuple[Tensor, int]:
    """Round float zeros to the nearest integer in ``[0, 2^b-1]`` (what int zero-point formats
    hold); also returns how many groups had to be clamped into that range."""
    r = torch.round(z_u)
    clamped = int(((r < 0) | (r > 2**bits - 1)).sum())
    return r.clamp(0, 2**bits - 1).to(torch.int64), clamped


def signed_back(u: Tensor, scale: Tensor, z_u: Tensor, spec: QuantSpec) -> QuantWeight:
    """The :class:`QuantWeight` in ``spec``'s own code range from unsigned codes and zeros."""
    shift = -spec.qmin
    return QuantWeight(u - shift, scale, z_u.to(scale.dtype) - shift, spec)


@dataclass
class WeightError:
    """max |ΔW| and relative Frobenius error ‖ΔW‖/‖W‖, accumulated over layers."""

    max_abs: float = 0.0
    sq_err: float = 0.0
    sq_ref: float = 0.0
    layers_changed: int = 0

    def add(self, max_abs: float, sq_err: float, sq_ref: float) -> None:
        self.max_abs = max(self.max_abs, max_abs)
        self.sq_err += sq_err
        self.sq_ref += sq_ref
        self.layers_changed += max_abs > 0

    def summary(self) -> dict:
        rel = math.sqrt(self.sq_err / self.sq_ref) if self.sq_ref else 0.0
        return {"max_abs_dW": self.max_abs, "rel_fro_dW": rel, "layers_changed": self.layers_changed}


def storage_errors(u: Tensor, z_u: Tensor, z_int: Tensor, scale: Tensor, stored_scale: Tensor,
                   group_size: int) -> tuple[dict[str, tuple[float, float]], float]:
    """How much storing integer zeros and ``stored_scale`` changes ``W = (u - z_u)·s`` (in float64).

    Returns ``{"zero_points" | "scales" | "total": (max |ΔW|, ‖ΔW‖²)}`` and ``‖W‖²``:
    zero points alone ``(z_u - z_int)·s``, scales alone ``(u - z_u)·(s' - s)``, and both, which
    is what an engine computes, ``(u - z_int)·s' - (u - z_u)·s``."""
    d = grouped(u.double(), group_size) - z_u.double().unsqueeze(-1)  # u - z_u, exact
    s, s2 = scale.double(), stored_scale.double()
    dz, ds = z_u.double() - z_int.double(), s2 - s
    sq_d = (d * d).sum(-1)
    e = d * ds.unsqueeze(-1) + (dz * s2).unsqueeze(-1)
    out = {"zero_points": (float((dz * s).abs().max()), float((dz * s).pow(2).sum()) * d.shape[-1]),
           "scales": (float((d.abs().amax(-1) * ds.abs()).max()), float((sq_d * ds * ds).sum())),
           "total": (float(e.abs().max()), float((e * e).sum()))}
    return out, float((sq_d * s * s).sum())
