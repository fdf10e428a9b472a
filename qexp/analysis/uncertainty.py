"""Uncertainty: seeds and eval units (perplexity windows, accuracy items) → means, intervals, verdicts.

Records keep each perplexity window's mean NLL (``eval.<set>.window_nll.<stage>``) and each lm-eval
item's score (``eval.lm_eval.<stage>.items.<task>``). :func:`record_units` turns them into *units*
per metric: the arrays a metric is computed from (one array for ``ppl/…`` and ``acc/<task>/…``; one
per member task for a suite average such as ``acc/csqa7_offline/…``).

A method's value at one setting is the mean over its seeds (cells that differ only in ``seed``).
Its 95 % interval, and that of the difference between two methods, come from one bootstrap:
each draw resamples the seeds (with replacement) and, inside each cell, the eval units (with
replacement; the same unit indices for every cell, since all cells score the same windows or
items: a paired bootstrap), and recomputes the metric from the resampled units (perplexity =
exp(mean NLL), accuracy = mean score, a suite = the mean of its members). Where a record has no
units (records before issue 21) and there are several seeds, the interval is Student's t over the
seeds (paired by seed), since a percentile bootstrap over 2–3 values is far too narrow.

A paper's ordering "A better than B" **holds** when the interval of the difference (A better
by the metric's direction) lies above 0, **flips** when it lies below 0, and is **unresolved**
otherwise, and always when there is nothing to resample: one seed and no per-unit data.
``basis`` says what the interval covers (``seeds×windows``, ``windows (1 seed)``, ``seeds (t; …)``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import metrics as M

B = 2000  # bootstrap draws
# Seeds an ordering needs before it can hold or flip (issue 21: fewer than 2 seeds never hold). With
# --min-seeds 1, one seed with per-window / per-item data is judged over the eval units alone.
MIN_SEEDS = 2
LEVEL = 0.95
VERDICTS = ("holds", "flips", "unresolved")
# Config values that do not change a cell's numbers (how fast or how verbose it ran).
HARMLESS = ("eval.log_samples", "eval.lm_eval_batch_size", "eval.batch_size", "train.log_every",
            "train.checkpoint_every", "train.gradient_checkpointing")


class Units(dict):
    """record path → {metric name: [arrays]}; kept in ``DataFrame.attrs`` without being deep-copied
    by every pandas operation."""

    def __deepcopy__(self, memo: dict) -> Units:
        return self

    def __eq__(self, other: object) -> bool:  # pandas compares attrs (concat): by identity, never by arrays
        return self is other

    __hash__ = None  # type: ignore[assignment]


def _bits(s: Any) -> np.ndarray | None:
    if isinstance(s, str):
        return np.frombuffer(s.encode(), dtype=np.uint8).astype(np.float64) - ord("0")
    if isinstance(s, list) and s:
        return np.asarray(s, dtype=np.float64)
    return None


def record_units(rec: dict) -> dict[str, list[np.ndarray]]:
    """The per-window / per-item arrays of one record, by metric name (``ppl/<set>/<stage>``,
    ``<metric>/<task>/<stage>``, ``<metric>/<suite>/<stage>``); empty for records that predate them."""
    ev = rec.get("eval") or {}
    out: dict[str, list[np.ndarray]] = {}
    for name, e in ev.items():
        if name != "lm_eval" and isinstance(e, dict):
            for stage, nll in (e.get("window_nll") or {}).items():
                if nll:
                    out[f"ppl/{name}/{stage}"] = [np.asarray(nll, dtype=np.float64)]
    for stage, d in (ev.get("lm_eval") or {}).items():
        items = {t: {m: a for m, v in per.items() if m != "doc_ids" and (a := _bits(v)) is not None}
                 for t, per in (d.get("items") or {}).items()}
        for task, per in items.items():
            for m, a in per.items():
                out[f"{m}/{task}/{stage}"] = [a]
        for suite, info in (d.get("suites") or {}).items():
            for m in ("acc", "acc_norm"):
                members = list(zip(info.get("tasks", []), info.get(m, []), strict=False))
                arrays = [items.get(t, {}).get(k) for t, k in members]
                if members and all(a is not None for a in arrays):
                    out[f"{m}/{suite}/{stage}"] = arrays
    return out


def sample_units(cell_dir: Path, rec: dict) -> dict[str, list[np.ndarray]]:
    """Per-item units from lm-eval samples written next to a record (``eval.log_samples=true``:
    ``samples_<stage>/<task>.jsonl``, also where a reused cell ran), for records whose ``eval`` has
    no ``items`` (those before issue 21)."""
    out: dict[str, list[np.ndarray]] = {}
    dirs = [cell_dir] + ([Path(rec["reused_from"])] if rec.get("reused_from") else [])
    for d in dirs:
        for f in sorted(d.glob("samples_*/*.jsonl")):
            stage, task = f.parent.name.removeprefix("samples_"), f.stem
            if any(k.endswith(f"/{task}/{stage}") for k in out):
                continue
            from ..eval.lmeval import item_scores  # torch: only when there are samples to read

            rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            for m, v in item_scores({task: rows}).get(task, {}).items():
                if m != "doc_ids" and (a := _bits(v)) is not None:
                    out[f"{m}/{task}/{stage}"] = [a]
    return out


def statistic(metric: str, arrays: list[np.ndarray], idx: list[np.ndarray] | None = None) -> np.ndarray | float:
    """The metric from its units (indexed by ``idx`` [draws, n] per array, if given): exp(mean NLL)
    for perplexity, else the mean of the members' means."""
    means = [a.mean() if idx is None else a[i].mean(axis=-1) for a, i in zip(arrays, idx or [None] * len(arrays),
                                                                              strict=True)]
    value = sum(means) / len(means)
    return np.exp(value) if M.parse(metric).kind == "ppl" else value


@dataclass
class Cells:
    """One method's cells at one setting: seed, recorded value and units (None: not in the record)."""

    metric: str
    seeds: list[int]
    values: list[float]
    units: list[list[np.ndarray] | None] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def has_units(self) -> bool:
        return bool(self.units) and all(u is not None for u in self.units)

    def mean(self) -> float:
        return float(np.mean(self.values))

    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if self.n > 1 else float("nan")


def _draw_units(groups: list[Cells], rng: np.random.Generator, draws: int) -> dict[tuple[int, int], list]:
    """Per (group, cell) position: one index array [draws, len] per unit array; shared by every cell
    whose arrays have the same lengths (the same windows / items: paired)."""
    shared: dict[tuple[int, ...], list[np.ndarray]] = {}
    out = {}
    for gi, g in enumerate(groups):
        for ci, u in enumerate(g.units):
            if u is None:
                continue
            key = tuple(len(a) for a in u)
            if key not in shared:
                shared[key] = [rng.integers(0, n, size=(draws, n), dtype=np.int32) for n in key]
            out[(gi, ci)] = shared[key]
    return out


def _cell_draws(groups: list[Cells], rng: np.random.Generator, draws: int) -> list[np.ndarray]:
    """Per group: [cells, draws], each cell's metric from resampled units (its value if it has none).
    Drawn in chunks, so a 14k-item task never holds more than ~4M indices at once."""
    size = max((sum(len(a) for a in u) for g in groups for u in g.units if u is not None), default=1)
    step = max(1, min(draws, 4_000_000 // size))
    out = [np.empty((g.n, draws)) for g in groups]
    for start in range(0, draws, step):
        k = min(step, draws - start)
        idx = _draw_units(groups, rng, k)
        for gi, g in enumerate(groups):
            for ci, (u, v) in enumerate(zip(g.units or [None] * g.n, g.values, strict=True)):
                out[gi][ci, start:start + k] = v if u is None else statistic(g.metric, u, idx[(gi, ci)])
    return out


def bootstrap(groups: list[Cells], draws: int = B, seed: int = 0) -> np.ndarray | None:
    """[len(groups), draws]: each group's value (mean over resampled seeds of the metric from
    resampled units); None when nothing varies (every group one seed without units)."""
    if all(g.n < 2 and not g.has_units for g in groups):
        return None
    rng = np.random.default_rng(seed)
    per_cell = _cell_draws(groups, rng, draws)
    paired = len({tuple(sorted(g.seeds)) for g in groups}) == 1  # the same seeds: draw the same for all
    common = rng.integers(0, groups[0].n, size=(draws, groups[0].n)) if paired else None
    out = np.empty((len(groups), draws))
    for gi, g in enumerate(groups):
        pick = np.argsort(g.seeds)[common] if paired else rng.integers(0, g.n, size=(draws, g.n))
        out[gi] = per_cell[gi][pick, np.arange(draws)[:, None]].mean(axis=1)
    return out


def basis(groups: list[Cells]) -> str:
    """What the interval resamples, in words (or why there is none)."""
    n = min(g.n for g in groups)
    unit = "windows" if M.parse(groups[0].metric).kind == "ppl" else "items"
    if all(g.has_units for g in groups):
        return f"seeds×{unit}" if n > 1 else f"{unit} (1 seed)"
    if n > 1:
        return f"seeds (t; no per-{unit[:-1]} data)"
    return f"none: 1 seed and no per-{unit[:-1]} data"


def interval(x: np.ndarray | None) -> tuple[float, float]:
    if x is None:
        return math.nan, math.nan
    lo, hi = np.quantile(x, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(lo), float(hi)


def verdict(lo: float, hi: float) -> str:
    """holds / flips / unresolved from the interval of (better − worse), in "better" units."""
    if math.isnan(lo) or math.isnan(hi):
        return "unresolved"
    return "holds" if lo > 0 else "flips" if hi < 0 else "unresolved"


def _t_interval(groups: list[Cells], sign: int = 1) -> tuple[float, float]:
    """Student-t interval of one group's mean, or of ``sign · (a − b)`` (paired by seed when both have
    the same seeds): used instead of the bootstrap when only seeds vary, because a percentile
    bootstrap over 2–3 values is far too narrow."""
    from scipy import stats

    if len(groups) == 1:
        d = np.asarray(groups[0].values)
        n, se = len(d), d.std(ddof=1) / math.sqrt(len(d))
    else:
        a, b = groups
        if sorted(a.seeds) == sorted(b.seeds):
            va, vb = (np.asarray(g.values)[np.argsort(g.seeds)] for g in (a, b))
            d = sign * (va - vb)
            n, se = len(d), d.std(ddof=1) / math.sqrt(len(d))
        else:
            d = np.array([sign * (a.mean() - b.mean())])
            n, se = min(a.n, b.n), math.sqrt(a.std() ** 2 / a.n + b.std() ** 2 / b.n)
    half = stats.t.ppf((1 + LEVEL) / 2, n - 1) * se
    return float(d.mean() - half), float(d.mean() + half)


def summary(g: Cells, draws: int = B) -> dict[str, Any]:
    """mean, std, n, the 95 % interval of the mean and its basis for one method's cells."""
    if g.has_units:
        lo, hi = interval(bootstrap([g], draws)[0])
    else:
        lo, hi = _t_interval([g]) if g.n > 1 else (math.nan, math.nan)
    return {"mean": g.mean(), "std": g.std(), "n": g.n, "ci_low": lo, "ci_high": hi, "basis": basis([g])}


def compare(better: Cells, worse: Cells, sign: int, draws: int = B, min_seeds: int | None = None) -> dict[str, Any]:
    """The difference ``sign · (better − worse)`` (positive: the expected order), its interval and verdict.
    With fewer than ``min_seeds`` seeds on either side (default :data:`MIN_SEEDS`) the verdict is
    ``unresolved`` whatever the interval (the interval is still reported)."""
    if better.has_units and worse.has_units:
        b = bootstrap([better, worse], draws)
        lo, hi = interval(sign * (b[0] - b[1]))
    elif min(better.n, worse.n) > 1:
        lo, hi = _t_interval([better, worse], sign)
    else:
        lo, hi = math.nan, math.nan
    need = MIN_SEEDS if min_seeds is None else min_seeds
    few = min(better.n, worse.n) < need
    return {"diff": sign * (better.mean() - worse.mean()), "ci_low": lo, "ci_high": hi,
            "verdict": "unresolved" if few else verdict(lo, hi),
            "basis": basis([better, worse]) + (f"; fewer than {need} seeds" if few else ""),
            "n_better": better.n, "n_worse": worse.n}


def pm(mean: float, lo: float, hi: float, fmt: Any = "{:.2f}".format) -> str:
    """``mean ± half-width`` of the interval (``mean`` alone when there is none)."""
    if mean is None or pd.isna(mean):
        return "–"
    if pd.isna(lo) or pd.isna(hi):
        return fmt(mean)
    return f"{fmt(mean)} ± {fmt((hi - lo) / 2)}"


def differing(cells: pd.DataFrame, trains: bool = True) -> dict[str, list[str]]:
    """Config keys (besides ``seed``) whose values differ between ``cells`` (one row per cell, config
    columns as in the tidy frame): {key: sorted values}. Keys a record lacks are not compared;
    ``train.*`` is ignored for methods that do not train, and :data:`HARMLESS` keys always."""
    out = {}
    for c in cells.columns:
        if "." not in c or c in HARMLESS or (not trains and c.startswith("train.")):
            continue
        vals = {str(v) for v in cells[c] if not (v is None or (isinstance(v, float) and math.isnan(v)))}
        if len(vals) > 1:
            out[c] = sorted(vals)
    if "dataset" in cells and cells["dataset"].nunique() > 1:
        out["dataset"] = sorted(map(str, cells["dataset"].unique()))
    return out


class MixedSettings(ValueError):
    """Cells that would be averaged as seeds of one setting differ in other config values."""


def trains(method: str) -> bool:
    from ..methods import registry

    cls = registry().get(method)
    return True if cls is None else bool(cls.TRAINS)


def settings(df: pd.DataFrame, metric: str) -> tuple[list[str], list[tuple[dict, Cells]]]:
    """The setting keys (model, method, bits, group_size, dataset and every config value that varies
    between cells of one method, e.g. ``train.steps``) and, per setting, its cells over seeds."""
    rows = df[df["metric"] == metric]
    if rows.empty:
        have = sorted(set(df["metric"]))
        raise KeyError(f"metric {metric!r} has no values here; available: {', '.join(have)}")
    units = df.attrs.get("units") or {}
    cells = rows.drop_duplicates("cell_id")
    by = [cells["method"], cells["group_size"], cells["bits"]]
    varying = [c for c in cells.columns if "." in c and c not in HARMLESS
               and cells[c].astype(str).groupby(by).nunique().max() > 1]  # within a method: a study's axis
    keys = ["model", "method", "bits", "group_size", "dataset", *varying]
    out = []
    for key, g in cells.groupby(keys, dropna=False, sort=True):
        g = g.drop_duplicates("seed")
        out.append((dict(zip(keys, key, strict=True)),
                    Cells(metric, [int(x) for x in g["seed"]], list(g["value"]),
                          [units.get(p, {}).get(metric) for p in g["path"]])))
    return keys, out


def seed_summary(df: pd.DataFrame, metric: str, draws: int = B) -> pd.DataFrame:
    """One row per setting (:func:`settings`), over the cells that differ only in ``seed``: ``mean``,
    ``std``, ``n``, the 95 % interval of the mean (``ci_low``, ``ci_high``), its ``basis`` and the
    ``seeds``. ``metric``: a full name with its stage (``ppl/wikitext_sample/final``)."""
    _, found = settings(df, metric)
    return pd.DataFrame([{**key, **summary(c, draws), "seeds": c.seeds} for key, c in found])


def by_setting(found: list[tuple[dict, Cells]], rest: list[str]) -> dict[tuple, list[tuple[dict, Cells]]]:
    """:func:`settings`' cells grouped by their values of the keys ``rest``. A method that does not train
    (gptq, rtn) is one cell for every budget: it joins every group that matches it outside ``train.*``."""
    fixed = [i for i, k in enumerate(rest) if not k.startswith("train.")]
    groups: dict[tuple, list[tuple[dict, Cells]]] = {}
    for key, c in found:
        if trains(key["method"]):
            groups.setdefault(tuple(str(key[k]) for k in rest), []).append((key, c))
    for key, c in found:
        if not trains(key["method"]):
            mine = tuple(str(key[k]) for k in rest)
            for at in [at for at in groups if all(at[i] == mine[i] for i in fixed)] or [mine]:
                groups.setdefault(at, []).append((key, c))
    return groups


def pairwise(df: pd.DataFrame, metric: str, draws: int = B, along: str = "method") -> pd.DataFrame:
    """Every pair of settings that differ only in ``along`` (default: every pair of methods; a study's axis,
    e.g. ``method.phi``, compares its values within a method). With ``method``, methods that do not train join
    every budget, as in :func:`stability`. Per pair: the better one by its mean (``better``, by the metric's
    direction), the difference, its 95 % interval and verdict (``holds``: the interval excludes 0;
    ``unresolved`` otherwise)."""
    keys, found = settings(df, metric)
    if along not in keys:
        raise KeyError(f"along={along!r} is not a setting key of these records; choose one of: {', '.join(keys)}")
    sign = M.direction(metric) or 1
    rest = [k for k in keys if k != along]
    out = []
    for at, members in by_setting(found, rest).items():
        for (ma, a), (mb, b) in combinations([(str(key[along]), c) for key, c in members], 2):
            (mw, w), (ml, lose) = ((ma, a), (mb, b)) if sign * (a.mean() - b.mean()) >= 0 else ((mb, b), (ma, a))
            c = compare(w, lose, sign, draws)
            out.append({**dict(zip(rest, at, strict=True)), "better": mw, "worse": ml, "better_mean": w.mean(),
                        "worse_mean": lose.mean(), **c})
    return pd.DataFrame(out)


def seeds_markdown(df: pd.DataFrame, metric: str, draws: int = B, along: str = "method") -> str:
    """:func:`seed_summary` and :func:`pairwise` as Markdown (the CLI's ``--seeds METRIC [--along KEY]``)."""
    keys, _ = settings(df, metric)
    s, pw = seed_summary(df, metric, draws), pairwise(df, metric, draws, along)
    k = M.scale(metric)
    f = "{:.4g}".format
    lines = [f"{metric}: mean ± half-width of the 95 % interval over seeds (and eval windows / items where the records "
             f"keep them)", "", "| " + " | ".join([*keys, "mean ± CI", "std", "n", "basis"]) + " |",
             "|" + "---|" * (len(keys) + 4)]
    for _, d in s.iterrows():  # (config keys have dots: no itertuples)
        lines.append("| " + " | ".join([*(str(d[c]) for c in keys), pm(d["mean"] * k, d["ci_low"] * k,
                                                                      d["ci_high"] * k, f),
                                        f(d["std"] * k) if d["std"] == d["std"] else "–", str(d["n"]), d["basis"]])
                     + " |")
    rest = [c for c in keys if c != along]
    lines += ["", f"Every pair of {along} values at each setting: the better by its mean, the difference "
              "[95 % interval], verdict", "",
              "| " + " | ".join([*rest, "better", "worse", "difference [95 % CI]", "n", "verdict", "basis"]) + " |",
              "|" + "---|" * (len(rest) + 6)]
    for _, d in pw.iterrows():
        ci = "" if d["ci_low"] != d["ci_low"] else f" [{f(d['ci_low'] * k)}, {f(d['ci_high'] * k)}]"
        lines.append("| " + " | ".join([*(str(d[c]) for c in rest), d["better"], d["worse"], f"{f(d['diff'] * k)}{ci}",
                                        f"{d['n_better']}, {d['n_worse']}", d["verdict"], d["basis"]]) + " |")
    if "train.steps" in keys and along == "method":  # a budget study: where the ordering stops moving
        st = stability(df, metric, "train.steps", draws)
        other = [c for c in rest if c != "train.steps" and st[c].nunique() > 1]  # e.g. bits, when they vary
        lines += ["", "Ranking per budget (by mean; methods without training at every budget), the pairs whose "
                  "order moved since the previous budget, and the pairs resolved (interval excludes 0)", "",
                  "| " + " | ".join([*other, "train.steps", "ranking", "moved since previous", "resolved pairs"])
                  + " |",
                  "|" + "---|" * (len(other) + 4)]
        lines += [f"| {''.join(str(r[c]) + ' | ' for c in other)}{r['train.steps']} | {r['ranking']} | "
                  f"{'–' if pd.isna(r['moved_since_previous']) else int(r['moved_since_previous'])}"
                  f"{': ' + r['moved'] if r['moved'] else ''} | {r['resolved']}/{r['pairs']} |"
                  for _, r in st.iterrows()]
    return "\n".join(lines) + "\n"


def stability(df: pd.DataFrame, metric: str, axis: str = "train.steps", draws: int = B) -> pd.DataFrame:
    """Where the methods' ordering stops moving along ``axis`` (the budget study: ``train.steps``):
    per value, the ranking by mean (methods that do not train count at every value), the pairs whose
    order differs from the previous value's (point estimates), and how many pairs are resolved there
    (interval excludes 0). One row per value of ``axis`` and per setting of the other keys (bits, ...):
    a ranking never mixes two bit widths."""
    keys, found = settings(df, metric)
    if axis not in keys:
        raise KeyError(f"{axis} does not vary in these records; varying: {', '.join(k for k in keys if '.' in k)}")
    sign = M.direction(metric) or 1
    rest = [k for k in keys if k not in ("method", axis)]
    out = []
    for at, members in sorted(by_setting(found, rest).items()):
        previous = None
        for v in sorted({key[axis] for key, _ in members if trains(key["method"])}):
            cells = {key["method"]: c for key, c in members if key[axis] == v or not trains(key["method"])}
            order = sorted(cells, key=lambda m: -sign * cells[m].mean())
            pairs = list(combinations(order, 2))  # (better, worse) by mean
            resolved = sum(compare(cells[a], cells[b], sign, draws)["verdict"] == "holds" for a, b in pairs)
            moved = [] if previous is None else [f"{a} overtakes {b}" for a, b in pairs if (b, a) in previous]
            out.append({**dict(zip(rest, at, strict=True)), axis: v, "ranking": " > ".join(order),
                        "pairs": len(pairs), "resolved": resolved,
                        "moved_since_previous": len(moved) if previous is not None else None,
                        "moved": ", ".join(moved)})
            previous = set(pairs)
    return pd.DataFrame(out)
