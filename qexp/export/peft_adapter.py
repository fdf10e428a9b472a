"""Base + LoRA adapters in PEFT's format (``export/peft/``), for methods deployed as base + fp adapter.

``peft/base/`` is a plain transformers checkpoint of the frozen base as the adapter was trained on
it (the fp weight for ``lora``, the dequantized grid for ``qlora`` and ``cloq``); ``peft/adapter/``
holds ``adapter_config.json`` (written by ``peft.LoraConfig``) and ``adapter_model.safetensors``
(``lora_A [r, d_in]``, ``lora_B [d_out, r]``, ``scaling = lora_alpha / r``), which
``PeftModel.from_pretrained(base, adapter)`` loads. Adapters PEFT has no type for (QWHA's
Walsh–Hadamard coefficients, LoCA's DCT, SSH's Hartley spectrum, SHiRA's scaled sparse deltas) stay in
qexp's own ``adapter/`` format, and the report says so.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..quant.grid import dequantize
from .checkpoint import float_state, save
from .engines import EngineMissing, require

LORA = ("lora_A", "lora_B")


def unsupported(state: dict[str, dict]) -> list[str]:
    """Adapter classes (by name) that are not LoRA (``A``, ``B``, ``scaling``): PEFT cannot load them as LoRA."""
    return sorted({s["class"].rsplit(".", 1)[-1] for s in state.values()
                   if not set(LORA) <= set(s["tensors"]) or "scaling" not in s["attrs"]})


def base_weight(s: dict) -> tuple[Tensor, Tensor | None]:
    """The frozen base's dense weight and bias of one adapted layer, as its forward used them."""
    t = s["tensors"]
    if "weight" in t:  # lora, qlora: the float (or dequantized) weight buffer
        return t["weight"], t.get("bias")
    codes, scale = t["base.codes"], t["base.scale"]  # cloq: an integer QuantLinear base
    return dequantize(codes, scale, t["base.zero"], codes.shape[1] // scale.shape[1]), t.get("base.bias")


def write(path: Path, model: nn.Module, tok, state: dict[str, dict], dtype: torch.dtype) -> dict:
    """``path/base`` + ``path/adapter`` for LoRA-type ``state`` (:func:`qexp.export.adapters`)."""
    other = unsupported(state)
    if other:
        return {"skipped": f"PEFT has no adapter type matching {', '.join(other)}; adapter/ holds qexp's format"}
    try:
        peft = require("peft")
    except EngineMissing as e:
        return {"skipped": str(e)}
    ranks = {s["tensors"]["lora_A"].shape[0] for s in state.values()}
    scalings = {float(s["attrs"]["scaling"]) for s in state.values()}
    if len(ranks) != 1 or len(scalings) != 1:
        return {"skipped": f"layers differ in rank {sorted(ranks)} or scaling {sorted(scalings)}"}
    rank, scaling = ranks.pop(), scalings.pop()
    tensors = float_state(model, set(state), dtype)
    for name, s in state.items():
        w, b = base_weight(s)
        tensors[f"{name}.weight"] = w.to(dtype)
        if b is not None:
            tensors[f"{name}.bias"] = b.to(dtype)
    save(path / "base", model, tok, tensors, dtype)
    dropout = max(float(s["attrs"].get("dropout", 0.0)) for s in state.values())
    cfg = peft.LoraConfig(r=rank, lora_alpha=scaling * rank, lora_dropout=dropout, bias="none",
                          task_type="CAUSAL_LM", target_modules=sorted({n.rsplit(".", 1)[-1] for n in state}),
                          base_model_name_or_path="../base")
    cfg.save_pretrained(str(path / "adapter"))
    ab = {f"base_model.model.{n}.{k}.weight": s["tensors"][k].to(dtype).contiguous()
          for n, s in state.items() for k in LORA}
    save_file(ab, str(path / "adapter" / "adapter_model.safetensors"), metadata={"format": "pt"})
    return {"layers": len(state), "r": rank, "lora_alpha": scaling * rank, "lora_dropout": dropout,
            "adapter_bytes": (path / "adapter" / "adapter_model.safetensors").stat().st_size,
            "load": "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('peft/base'), 'peft/adapter')"}
