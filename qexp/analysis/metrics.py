"""Metric names: the one place that parses them and knows which direction is better.

Names are ``<kind>/<target>/<stage>``: ``ppl/wikitext2/final``, ``acc/mmlu5/final``,
``acc_norm/csqa7/base``. Record sections become metrics too: ``time/train``, ``mem/peak_rss_mb``,
``merge/max_abs_logit_diff``, ``train/loss_last``, ``size/model_bytes``. Parsing is tolerant: the stage
may be missing (W&B summaries, exports), lm-eval's ``acc,none`` becomes ``acc``, case is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

STAGES = ("fp", "base", "unmerged", "final")

# kind -> +1 (higher is better) or -1 (lower is better); as PEFT's method_comparison does it, one table.
DIRECTIONS: dict[str, int] = {
    "ppl": -1, "acc": +1, "acc_norm": +1, "exact_match": +1, "f1": +1,
    "time": -1, "mem": -1, "size": -1, "export": -1, "train": -1, "merge": -1, "init": -1,
}
# Exact names whose direction differs from their kind's (None: no "better", e.g. a count).
OVERRIDES: dict[str, int | None] = {
    "merge/lossless": +1, "merge/on_grid": +1, "merge/merged_layers": None, "merge/quant_layers": None,
    "train/steps": None, "train/resumed_from": None, "merge/codes_total": None, "merge/codes_increased": None,
    "merge/codes_decreased": None, "merge/codes_unchanged": None,
}
# Display: accuracies are fractions in records and percentages in the papers.
SCALE: dict[str, float] = {"acc": 100.0, "acc_norm": 100.0, "exact_match": 100.0}
UNITS: dict[str, str] = {"ppl": "perplexity", "acc": "accuracy %", "acc_norm": "accuracy % (acc_norm)",
                         "time": "seconds", "mem": "MB", "size": "bytes"}
# Where a model's size in bytes may be, in order of preference (export helper / future records).
SIZE_METRICS = ("size/model_bytes", "export/model_bytes", "export/bytes", "export/packed_bytes")
# Markers of offline stand-ins for the papers' tasks (qexp/tasks) and of samples of their test sets
# (wikitext_sample: 1,000 WikiText test sentences): never the papers' own evaluation.
STANDIN_MARKERS = ("_offline", "_standin", "qexp_", "_sample")
# qexp pack tasks that read the papers' own test sets from the hub (qexp/tasks/qexp_*.yaml): not stand-ins.
# (qexp_sql is not here: its hub test rows are not HALO's test file; qexp_asdiv is offline.)
PAPER_SETS = ("qexp_gsm8k", "qexp_gsm8k_cot", "qexp_viggo")


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str
    target: str | None
    stage: str | None


def parse(name: str) -> Metric:
    """Split a metric name into kind / target / stage (tolerant of missing parts)."""
    parts = [p for p in str(name).strip().split("/") if p]
    if not parts:
        raise ValueError(f"metric name {name!r} is empty")
    kind = parts[0].split(",")[0].lower()
    stage = parts[-1].lower() if len(parts) >= 3 and parts[-1].lower() in STAGES else None
    rest = parts[1:-1] if stage else parts[1:]
    target = "/".join(rest) or None
    canon = "/".join(p for p in (kind, target, stage) if p)
    return Metric(canon, kind, target, stage)


def direction(name: str) -> int | None:
    """+1 if higher is better, -1 if lower is better, None if unknown or not a quality."""
    m = parse(name)
    base = f"{m.kind}/{m.target}" if m.target else m.kind
    if base in OVERRIDES:
        return OVERRIDES[base]
    return DIRECTIONS.get(m.kind)


def scale(name: str) -> float:
    """Factor from a record's value to the papers' unit (fraction -> %)."""
    return SCALE.get(parse(name).kind, 1.0)


def is_metric(name: str) -> bool:
    """Whether a column / summary key looks like a qexp metric (known kind and a target)."""
    try:
        m = parse(name)
    except ValueError:
        return False
    return m.kind in DIRECTIONS and m.target is not None and "/" in str(name)


def is_standin(name: str) -> bool:
    """Whether the metric is computed on an offline stand-in, not the papers' own set."""
    target = parse(name).target if "/" in str(name) else None
    return target not in PAPER_SETS and any(s in name for s in STANDIN_MARKERS)


def pick(available: set[str], candidates: list[str], stage: str | None) -> str | None:
    """First ``<candidate>/<stage>`` (or the bare candidate when stage is None) that is ``available``."""
    for c in candidates:
        name = f"{c}/{stage}" if stage else c
        if name in available:
            return name
    return None
