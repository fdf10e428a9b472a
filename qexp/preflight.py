"""Checks that run before any work: one cell (:func:`check`) and every cell of a sweep (:func:`check_sweep`).

:func:`qexp.config.validate` checks values (schema, ranges, choices). Here the config also meets
what it refers to, without loading a model or reading a corpus:

- the method accepts its hyper-parameters and the quantizer spec (its constructor runs);
- data files exist, embedded corpora are known;
- the model's shapes, read from its config (``model.random``, the cached ``config.json`` of an
  embedded model or its GGUF header, a local checkpoint's ``config.json``, the hub cache, or
  ``qexp/archs/<model>.json``), are divisible by ``group_size``; a local ``model.path`` is a
  checkpoint directory;
- offline lm-eval tasks have their data, other task names exist in lm-eval's registry.

A ``--multirun`` sweep is composed cell by cell, exactly as the launcher will compose it, and each
cell is checked before the first one starts (``qexp.callbacks.ReportFailures``).
"""

from __future__ import annotations

import json
import logging
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .config import ConfigError, check_group_size, method_config, sources, validate

log = logging.getLogger("qexp")
ARCHS = Path(__file__).with_name("archs")  # config.json of the hub models (also used by qexp.plan)


def check(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` (key, value, valid choices) if the cell cannot run as configured."""
    from . import data
    from .methods import get as get_method
    from .quant import QuantSpec

    validate(cfg)
    get_method(cfg.method.name)(method_config(cfg), QuantSpec(cfg.bits, cfg.group_size, cfg.quant.sym))
    for key, src in sources(cfg):
        if src.kind == "files":
            missing = [f for f in src.files if not Path(f).expanduser().is_file()]
            if not src.files or missing:
                raise ConfigError(f"{key}.files={list(src.files)}: {missing or 'no files given'} "
                                  "not found (local .jsonl/.json/.txt/.csv/.parquet files)")
        elif src.kind == "embedded" and src.name not in data.EMBEDDED:
            raise ConfigError(f"{key}.name={src.name!r} is not an embedded corpus; choose one of: "
                              f"{', '.join(data.EMBEDDED)}")
    widths = target_widths(cfg.model, cfg.cache_dir)
    if widths:
        check_group_size(cfg.group_size, widths)
    if cfg.eval.tasks:
        from .eval.lmeval import FILES, check_tasks, task_spec

        for task in cfg.eval.tasks:
            if task in FILES:
                task_spec(task, cfg.cache_dir)  # its data files exist
        check_tasks(list(cfg.eval.tasks))


def target_widths(model: DictConfig, cache_dir: str) -> dict[str, int] | None:
    """``in_features`` of each targeted projection (Llama-style names), from the model's config;
    None where the config cannot be read without loading the model (a hub id not in the cache)."""
    arch = arch_dict(model, cache_dir)
    if arch is None or not {"hidden_size", "num_attention_heads", "intermediate_size"} <= set(arch):
        log.info("model=%s: shapes unknown before loading; group_size is checked after loading", model.name)
        return None
    hidden, heads = arch["hidden_size"], arch["num_attention_heads"]
    head_dim = arch.get("head_dim") or hidden // heads
    widths = {"q_proj": hidden, "k_proj": hidden, "v_proj": hidden, "o_proj": heads * head_dim,
              "gate_proj": hidden, "up_proj": hidden, "down_proj": arch["intermediate_size"]}
    return {t: widths[t] for t in model.targets if t in widths}


def arch_dict(model: DictConfig, cache_dir: str) -> dict[str, Any] | None:
    """The model's ``config.json`` as a dict (see the module docstring for where it is read)."""
    from .models import cache_root, gguf_path

    if model.source == "random":
        from transformers import LlamaConfig

        return LlamaConfig(**OmegaConf.to_container(model.random, resolve=True)).to_dict()
    if model.source == "embedded":
        cached = cache_root(cache_dir) / model.name / "config.json"
        if cached.exists():
            return json.loads(cached.read_text())
        return _gguf_config(str(gguf_path(model)))
    if not model.path:
        raise ConfigError(f"model={model.name}: model.source=hub needs model.path (a hub id or a local directory)")
    local = Path(model.path).expanduser()
    if local.is_dir() or model.path.startswith((".", "/", "~")):
        if not local.exists():
            raise ConfigError(f"model.path={model.path!r} does not exist (a local directory, or a hub id like "
                              "'meta-llama/Llama-2-7b-hf')")
        if not (local / "config.json").is_file():
            raise ConfigError(f"model.path={model.path!r} is not a checkpoint directory (no config.json in it); "
                              "give a directory saved by save_pretrained, or a hub id like 'meta-llama/Llama-2-7b-hf'")
        return json.loads((local / "config.json").read_text())
    return _hub_config(model.path, model.name)


@cache
def _gguf_config(path: str) -> dict:
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    return load_gguf_checkpoint(path, return_tensors=False)["config"]


@cache
def _hub_config(path: str, name: str) -> dict | None:
    """The hub model's config from the local hub cache, else ``qexp/archs/<name>.json`` if that is
    the same hub id, else None."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True).to_dict()
    except (OSError, ValueError):
        known = ARCHS / f"{name}.json"
        arch = json.loads(known.read_text()) if known.exists() else {}
        return arch if arch.get("_name_or_path") == path else None


def check_sweep(config: DictConfig) -> tuple[list[tuple[list[str], str]], int]:
    """Compose every cell of the ``--multirun`` sweep whose primary config is ``config`` (with its
    ``hydra`` node) as Hydra's basic sweeper will, and :func:`check` each one.

    Returns ``([(the cell's swept overrides, error) for each bad cell], number of cells)``."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    loader = GlobalHydra.instance().config_loader()
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create(config_loader=loader).parse_overrides([*params, *config.hydra.overrides.task])
    jobs = BasicSweeper.split_arguments(parsed, None)[0]
    swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    bad = []
    for job in jobs:
        try:
            check(loader.load_sweep_config(config, list(job)))
        except Exception as e:  # composition errors too: each is reported with its cell
            bad.append(([o for o in job if o.split("=", 1)[0] in swept] or list(job), f"{type(e).__name__}: {e}"))
    return bad, len(jobs)


def describe(bad: list[tuple[list[str], str]], total: int, run_anyway: bool) -> str:
    """The report of :func:`check_sweep`, one line per bad cell."""
    lines = [f"[qexp] {len(bad)} of {total} cells of this sweep are invalid"
             + ("; running the valid ones (skip_invalid=true):" if run_anyway else "; nothing was run:")]
    lines += [f"  - {' '.join(job)}: {err}" for job, err in bad]
    if not run_anyway:
        lines.append(f"Fix them, or run the {total - len(bad)} valid cells anyway with skip_invalid=true.")
    return "\n".join(lines)
