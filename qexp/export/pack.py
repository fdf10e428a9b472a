"""Dense bit packing of unsigned b-bit integers into int32 words.

Value ``i`` of a line sits at bit ``i·b`` of a little-endian bit stream, and a value may
straddle two words. For 2/4/8 bits this is the familiar "32/b values per word, lowest bits
first"; for 3 bits it is GPTQ's layout (32 values in 3 words: values 0-9 in word 0 bits 0-29,
value 10 split over word 0 bits 30-31 and word 1 bit 0, …). compressed-tensors packs 4/8-bit
weights the same way (along the other dimension).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_MASK32 = (1 << 32) - 1


def _positions(n: int, bits: int, device: torch.device) -> tuple[Tensor, Tensor]:
    start = torch.arange(n, device=device, dtype=torch.int64) * bits
    return start // 32, start % 32


def pack(values: Tensor, bits: int, dim: int) -> Tensor:
    """Pack ``values`` (integers in ``[0, 2^bits)``) along ``dim`` into int32 words."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits}: packing supports 1..8 bits")
    v = values.movedim(dim, -1).to(torch.int64)
    n = v.shape[-1]
    if (n * bits) % 32:
        raise ValueError(f"{n} values of {bits} bits do not fill whole int32 words (need a multiple of "
                         f"{32 // math.gcd(32, bits)})")
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise ValueError(f"values span [{int(v.min())}, {int(v.max())}], outside [0, {(1 << bits) - 1}]")
    word, off = _positions(n, bits, v.device)
    out = torch.zeros(*v.shape[:-1], n * bits // 32, dtype=torch.int64, device=v.device)
    out.index_add_(-1, word, (v << off) & _MASK32)
    spill = off + bits > 32  # the high part of a value that straddles into the next word
    if spill.any():
        out.index_add_(-1, word[spill] + 1, v[..., spill] >> (32 - off[spill]))
    out = torch.where(out >= 1 << 31, out - (1 << 32), out)  # two's complement int32
    return out.to(torch.int32).movedim(-1, dim).contiguous()


def unpack(words: Tensor, bits: int, dim: int, n: int) -> Tensor:
    """Inverse of :func:`pack`: ``n`` unsigned values per line along ``dim`` (int64)."""
    w = words.movedim(dim, -1).to(torch.int64) & _MASK32
    word, off = _positions(n, bits, w.device)
    mask = (1 << bits) - 1
    v = (w[..., word] >> off) & mask
    spill = off + bits > 32
    if spill.any():
        hi = (w[..., word[spill] + 1] << (32 - off[spill])) & mask
        v[..., spill] |= hi
    return v.movedim(-1, dim).contiguous()
