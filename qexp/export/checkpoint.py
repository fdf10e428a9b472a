"""Checkpoint directories: the float part of a model, config, tokenizer; and qexp's loader."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..models import set_module
from ..quant import QuantLinear, QuantSpec
from . import compressed, gptq
from .common import ExportError, signed_back

PACKED = {gptq.METHOD: gptq, compressed.METHOD: compressed}
WEIGHTS = "model.safetensors"
EXACT = Path("qexp_exact") / "exact.safetensors"  # a subfolder: engines glob *.safetensors at the top only
META = "qexp_export.json"


def float_state(model: nn.Module, skip: set[str], dtype: torch.dtype) -> dict[str, Tensor]:
    """The model's state dict minus the modules in ``skip``, tied tensors once, floats in ``dtype``."""
    out, seen = {}, set()
    for key, t in model.state_dict().items():
        if any(key.startswith(f"{s}.") for s in skip) or (t.numel() and t.data_ptr() in seen):
            continue
        seen.add(t.data_ptr())
        out[key] = (t.to(dtype) if t.is_floating_point() else t).detach().cpu().contiguous()
    return out


def save(path: Path, model: nn.Module, tok, tensors: dict[str, Tensor], dtype: torch.dtype,
         quant_config: dict | None = None) -> None:
    """``model.safetensors`` + ``config.json`` (+ ``quantization_config``) + generation config + tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, str(path / WEIGHTS),
              metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.update(dtype=str(dtype).removeprefix("torch."), architectures=[type(model).__name__])
    if quant_config:
        cfg["quantization_config"] = quant_config
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)
    if tok is not None:
        tok.save_pretrained(path)


def load(path: str | Path, exact: bool = True, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A model from an export directory, built by qexp (no engine needed).

    Packed formats become :class:`~qexp.quant.QuantLinear` layers with the unpacked codes,
    scales and zero points. ``exact=True`` takes the float zeros / fp32 scales kept in
    ``qexp_exact/`` where the format had to round them (lossless w.r.t. the merged model);
    ``exact=False`` reads the format's tensors only (what an inference engine sees).
    A dense checkpoint loads through ``AutoModelForCausalLM.from_pretrained``.
    """
    path = Path(path)
    if not (path / "config.json").exists():
        raise ExportError(f"{path} is not an export directory (no config.json)")
    config = AutoConfig.from_pretrained(path)
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    fmt = PACKED.get(qc.get("quant_method"))
    if fmt is None:
        raise ExportError(f"{path}: quant_method={qc.get('quant_method')!r}; qexp loads {', '.join(PACKED)}")
    meta = json.loads((path / META).read_text()) if (path / META).exists() else {}
    w = {} if fmt is gptq else qc["config_groups"]["group_0"]["weights"]
    bits = qc["bits"] if fmt is gptq else w["num_bits"]
    group_size = qc["group_size"] if fmt is gptq else (w.get("group_size") or -1)
    ours = meta.get("spec", {})  # qexp's own grid (signed or not); a foreign checkpoint is unsigned
    spec = QuantSpec(bits, ours.get("group_size", group_size), ours.get("symmetric", False))
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval().requires_grad_(False)
    tensors = load_file(str(path / WEIGHTS))
    extra = load_file(str(path / EXACT)) if exact and (path / EXACT).exists() else {}
    quantized = fmt.names(tensors)
    for name in quantized:
        u, scale, z, bias = fmt.read(tensors, name, bits)
        scale = extra.get(f"{name}.scale", scale.float())
        qw = signed_back(u, scale, z.to(scale.dtype), spec)
        if f"{name}.zero" in extra:
            qw.zero = extra[f"{name}.zero"]
        set_module(model, name, QuantLinear(qw, None if bias is None else bias.to(dtype)))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k.rsplit(".", 1)[0] not in quantized and k not in _tied(model)]
    if missing or unexpected:
        raise ExportError(f"{path}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def _tied(model: nn.Module) -> set[str]:
    return set(getattr(model, "all_tied_weights_keys", {}) or {})
