"""GPTQ v2 checkpoint tensors (GPTQModel's ``checkpoint_format: gptq_v2``).

Per linear ``<name>``: ``qweight`` int32 ``[d_in·b/32, d_out]`` (codes of ``Wᵀ`` packed along
the input dim, :func:`.common.pack` layout incl. 3-bit), ``qzeros`` int32 ``[n_groups, d_out·b/32]``
(integer zero points packed along the output dim; v2 stores the zero itself, v1 stored
``zero - 1``), ``scales`` ``[n_groups, d_out]`` in the export dtype, ``g_idx`` int32 ``[d_in]``
(``i // group_size``: qexp's groups are contiguous, ``desc_act: false``) and ``bias``.
Dequantization: ``W[o, i] = (u[i, o] - qzeros[g_idx[i], o]) · scales[g_idx[i], o]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import ExportError, check_words, pack, unpack

BITS = (2, 3, 4, 8)
METHOD = "gptq"


def layer(name: str, u: Tensor, scale: Tensor, z_int: Tensor, bias: Tensor | None, bits: int, group_size: int,
          sym: bool, dtype: torch.dtype) -> dict[str, Tensor]:
    """The GPTQ tensors of one linear from unsigned codes ``u [d_out, d_in]``, ``scale`` and
    integer zeros ``z_int [d_out, n_groups]`` (``qzeros`` are written for symmetric grids too)."""
    d_out, d_in = u.shape
    check_words("gptq", name, d_out, d_in, bits,
                "; GPTQ packs whole int32 words (use export=compressed or fp16 for this model)")
    g = d_in if group_size == -1 else group_size
    out = {
        f"{name}.qweight": pack(u.T, bits, dim=0),
        f"{name}.qzeros": pack(z_int.T, bits, dim=1),
        f"{name}.scales": scale.T.to(dtype).contiguous(),
        f"{name}.g_idx": (torch.arange(d_in) // g).to(torch.int32),
    }
    if bias is not None:
        out[f"{name}.bias"] = bias.to(dtype)
    return out


def names(tensors: dict[str, Tensor]) -> list[str]:
    return [k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")]


def read(tensors: dict[str, Tensor], name: str, bits: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Pop one linear's tensors: unsigned codes ``[d_out, d_in]``, scale and integer zeros
    ``[d_out, n_groups]``, bias."""
    qweight, qzeros = tensors.pop(f"{name}.qweight"), tensors.pop(f"{name}.qzeros")
    scales, g_idx = tensors.pop(f"{name}.scales"), tensors.pop(f"{name}.g_idx")
    n_groups, d_out = scales.shape
    d_in = qweight.shape[0] * 32 // bits
    g = d_in // n_groups
    if not torch.equal(g_idx.long(), torch.arange(d_in) // g):
        raise ExportError(f"gptq: {name}.g_idx is not contiguous groups of {g} (desc_act / act-order "
                          "checkpoints cannot be held by qexp's QuantLinear)")
    u = unpack(qweight, bits, dim=0, n=d_in).T
    z = unpack(qzeros, bits, dim=1, n=d_out).T
    # contiguous: a transposed view would change F.linear's kernel (and its float rounding)
    return u.contiguous(), scales.T.contiguous(), z.contiguous(), tensors.pop(f"{name}.bias", None)


def quant_config(bits: int, group_size: int, sym: bool, targets: list[str]) -> dict:
    """``quantization_config`` as GPTQModel writes it for v2 (also ``quantize_config.json``);
    GPTQ quantizes every linear of the blocks, so ``targets`` is not recorded."""
    return {"quant_method": METHOD, "checkpoint_format": "gptq_v2", "bits": bits, "group_size": group_size,
            "sym": sym, "desc_act": False, "lm_head": False, "pack_dtype": "int32", "true_sequential": True,
            "meta": {"quantizer": ["qexp"]}}
