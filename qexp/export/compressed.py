"""compressed-tensors ``pack-quantized`` checkpoint tensors (what vLLM serves as W4A16 / W8A16).

Per linear ``<name>``: ``weight_packed`` int32 ``[d_out, d_in·b/32]`` (signed codes
``c = u - 2^(b-1)`` stored with the offset ``2^(b-1)`` added back, i.e. the unsigned codes,
packed along the input dim), ``weight_scale`` ``[d_out, n_groups]`` in the export dtype,
``weight_shape`` int64 ``[d_out, d_in]`` and, when asymmetric, ``weight_zero_point`` int32
``[d_out·b/32, n_groups]`` (signed integer zeros, same offset, packed along the output dim).
Dequantization (``compressed_tensors``): ``W = (c - zp) · scale`` per group, i.e. ``(u - z_u) · s``.
vLLM's kernels take 4 and 8 bits only, so other widths are refused.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import check_words, pack, unpack

BITS = (4, 8)
METHOD = "compressed-tensors"


def layer(name: str, u: Tensor, scale: Tensor, z_int: Tensor, bias: Tensor | None, bits: int, group_size: int,
          sym: bool, dtype: torch.dtype) -> dict[str, Tensor]:
    """The tensors of one linear from unsigned codes ``u``, ``scale`` and integer zeros (in
    ``[0, 2^b-1]``; a symmetric layout drops them: every zero is ``2^(b-1)``). The group size
    is implied by ``scale``'s shape."""
    d_out, d_in = u.shape
    check_words("compressed", name, d_out, d_in, bits)
    out = {f"{name}.weight_packed": pack(u, bits, dim=1), f"{name}.weight_scale": scale.to(dtype).contiguous(),
           f"{name}.weight_shape": torch.tensor([d_out, d_in], dtype=torch.int64)}
    if not sym:
        out[f"{name}.weight_zero_point"] = pack(z_int, bits, dim=0)
    if bias is not None:
        out[f"{name}.bias"] = bias.to(dtype)
    return out


def names(tensors: dict[str, Tensor]) -> list[str]:
    return [k[: -len(".weight_packed")] for k in tensors if k.endswith(".weight_packed")]


def read(tensors: dict[str, Tensor], name: str, bits: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Pop one linear's tensors: unsigned codes, scale, integer zeros (unsigned), bias."""
    d_out, d_in = tensors.pop(f"{name}.weight_shape").tolist()
    u = unpack(tensors.pop(f"{name}.weight_packed"), bits, dim=1, n=d_in)
    scale = tensors.pop(f"{name}.weight_scale")
    zp = tensors.pop(f"{name}.weight_zero_point", None)
    z = torch.full(scale.shape, 2 ** (bits - 1), dtype=torch.int64) if zp is None else unpack(zp, bits, 0, d_out)
    return u, scale, z, tensors.pop(f"{name}.bias", None)


def quant_config(bits: int, group_size: int, sym: bool, targets: list[str]) -> dict:
    """``quantization_config`` for ``config.json``: one config group over ``targets`` (leaf
    names of the quantized linears), lm_head and everything else left dense."""
    leafs = "|".join(sorted(targets))
    weights = {"num_bits": bits, "type": "int", "symmetric": sym, "dynamic": False,
               "strategy": "channel" if group_size == -1 else "group",
               "group_size": None if group_size == -1 else group_size, "observer": "minmax", "actorder": None}
    return {"quant_method": METHOD, "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": [f"re:.*\\.({leafs})$"], "weights": weights,
                                          "input_activations": None, "output_activations": None,
                                          "format": "pack-quantized"}},
            "ignore": ["lm_head"], "kv_cache_scheme": None}
