"""Plots from the tidy records (matplotlib ``Figure`` objects, no global pyplot state): a metric vs bits
per method and quality vs bits per weight (Pareto front), both with 95 % intervals over seeds and eval
windows / items (:func:`.uncertainty.seed_summary`); a metric vs training steps (the budget study); the
training-loss curves from the records; and the cost per method from a ``qexp.bench`` result (measured
in interleaved rounds, not from cell timings taken while other work shared the machine). Perplexity
axes are logarithmic (embedded values span 20 to 1e6)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axis import Axis
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter, ScalarFormatter

from . import metrics as M
from .tables import registry
from .uncertainty import seed_summary, trains

log = logging.getLogger("qexp")
# Default metric per plot: the first one the records have (without the stage).
QUALITY = ("ppl/wikitext2", "ppl/wikitext_sample", "acc/mmlu5", "acc/csqa7", "acc/csqa6", "acc/mmlu5_offline",
           "acc/csqa7_offline", "ppl/c4", "ppl/xsum")
ACCURACY = tuple(m for m in QUALITY if m.startswith("acc")) + tuple(m for m in QUALITY if m.startswith("ppl"))


def _colors():
    """Distinct colours: tab10 first (the usual ≤ 10 methods), then tab20's lighter shades."""
    return iter(colormaps["tab10"].colors + colormaps["tab20"].colors[1::2])


def _pick(df: pd.DataFrame, metric: str | None, stage: str, prefer: tuple[str, ...]) -> str:
    have = set(df["metric"])
    name = M.pick(have, [metric] if metric else list(prefer), stage)
    if name is None:
        fixed = [m for m in sorted(have) if M.parse(m).stage == stage]
        raise ValueError(f"metric={metric or prefer!r} at stage {stage!r} is not in the records; have: {fixed}")
    return name


def _model(df: pd.DataFrame, model: str | None) -> pd.DataFrame:
    if model is None:
        model = df["model"].mode().iloc[0]
    if model not in set(df["model"]):
        raise ValueError(f"model={model!r} is not in the records; have: {sorted(set(df['model']))}")
    return df[df["model"] == model]


def _errors(s: pd.DataFrame, k: float) -> np.ndarray:
    """Asymmetric error bars from a :func:`seed_summary`: the 95 % interval, else ± std, where there are
    at least 2 seeds; none for one seed (its interval over eval windows mostly says how hard each window
    is, which every method shares: the paired differences of ``--seeds`` are the fair comparison)."""
    seeds = (s["n"] >= 2).to_numpy()
    lo = np.where(s["ci_low"].notna(), s["mean"] - s["ci_low"], s["std"].fillna(0))
    hi = np.where(s["ci_high"].notna(), s["ci_high"] - s["mean"], s["std"].fillna(0))
    return np.vstack([np.where(seeds, lo, 0), np.where(seeds, hi, 0)]) * k


def _n(s: pd.DataFrame) -> str:
    """Seeds per point for a legend: ``n=3``, or ``n=1–3`` when the points differ."""
    lo, hi = int(s["n"].min()), int(s["n"].max())
    return f"n={lo}" if lo == hi else f"n={lo}–{hi}"


def _plain_log(axis: Axis) -> None:
    """Plain numbers (30, 40, 60) on a log axis that spans less than a decade, not 3×10¹, 4×10¹."""
    lo, hi = sorted(axis.get_view_interval())
    if lo > 0 and hi / lo < 10:
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def plot_vs_bits(df: pd.DataFrame, metric: str | None = None, model: str | None = None,
                 stage: str = "final") -> Figure:
    """``metric`` vs bits, one line per method (mean over seeds, 95 % interval as error bars) at the most
    common group size; 16-bit methods and the fp model as horizontal lines."""
    d = _model(df, model)
    name = _pick(d, metric, stage, QUALITY)
    k = M.scale(name)
    summ = seed_summary(d, name)
    quant = summ[~summ["method"].isin(registry()["sixteen_bit"])]
    group = quant["group_size"].mode().iloc[0] if len(quant) else None
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.subplots()
    colors = _colors()
    for method, g in summ.groupby("method"):
        if method in registry()["sixteen_bit"]:
            ax.axhline(g["mean"].mean() * k, ls="--", lw=1, color="gray", label=f"{method} (16-bit)")
            continue
        g = g[g["group_size"] == group].groupby("bits").first().sort_index()  # one setting per bit width
        if len(g):
            ax.errorbar(g.index.astype(int), g["mean"] * k, yerr=_errors(g, k), marker="o", capsize=3,
                        label=f"{method} ({_n(g)})", color=next(colors))
    m = M.parse(name)
    fp = d[d["metric"] == f"{m.kind}/{m.target}/fp"]["value"]
    if len(fp):
        ax.axhline(fp.mean() * k, ls=":", color="black", label="fp16 (unquantized)")
    if m.kind == "ppl":
        ax.set_yscale("log")
    ax.set_xticks(sorted(d["bits"].dropna().unique().astype(int)))
    ax.set(xlabel="bits", ylabel=f"{m.kind}/{m.target} ({M.UNITS.get(m.kind, '')}{', log' if m.kind == 'ppl' else ''})",
           title=f"{name} vs bits, {d['model'].iloc[0]}"
                 + ("" if group is None else f", {'per-channel' if group == -1 else f'g{int(group)}'}"))
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="major", alpha=0.3)
    return fig


def grid_bits(bits: float, group_size: float, float_zero: bool = False) -> float:
    """Bits per quantized weight of a grouped integer grid as stored (GPTQ format): the code, plus one
    fp16 scale and one zero point (``bits`` wide, or fp16 where the method's zeros are floats) per
    ``group_size`` weights. Per-channel (-1): the code only (one scale per row of >= 576 weights adds
    < 0.06 bit, not counted)."""
    return float(bits) + ((16 + (16 if float_zero else bits)) / group_size if group_size > 0 else 0.0)


def sizes(d: pd.DataFrame) -> tuple[pd.Series, str]:
    """Per cell: model size in bytes from the records where they have one, else the grid's bits per
    quantized weight (:func:`grid_bits`, float zero points from ``merge/float_zero_points``); 16 for
    16-bit methods."""
    for s in M.SIZE_METRICS:
        hit = d[d["metric"] == s]
        if len(hit):
            return hit.groupby("cell_id")["value"].mean(), "model size (bytes)"
    cells = d.drop_duplicates("cell_id").set_index("cell_id")
    fz = d[d["metric"] == "merge/float_zero_points"].groupby("cell_id")["value"].max().reindex(cells.index)
    bpw = pd.Series([grid_bits(b, g, bool(z == 1)) for b, g, z in
                     zip(cells["bits"].astype(float), cells["group_size"].astype(float), fz, strict=True)],
                    index=cells.index)
    bpw = bpw.where(~cells["method"].isin(registry()["sixteen_bit"]), 16.0)
    return bpw, "bits per quantized weight (codes + fp16 scale + zero per group)"


def pareto(x: pd.Series, y: pd.Series, sign: int) -> pd.Index:
    """Cells on the front: no other cell is at most as large and strictly better."""
    order = sorted(x.index, key=lambda i: (x[i], -sign * y[i]))
    front, best = [], -np.inf
    for i in order:
        if sign * y[i] > best:
            front.append(i)
            best = sign * y[i]
    return pd.Index(front)


def plot_pareto(df: pd.DataFrame, metric: str | None = None, model: str | None = None,
                 stage: str = "final") -> Figure:
    """Quality (default: an accuracy, else perplexity on a log axis) vs bits per quantized weight, one
    marker per method and setting (mean over seeds, 95 % interval), the Pareto front as a line. Hollow
    markers: methods deployed as integer base + fp adapter, whose adapter bits are not on this axis."""
    d = _model(df, model)
    name = _pick(d, metric, stage, ACCURACY)
    k, sign = M.scale(name), M.direction(name) or 1
    x_cell, xlabel = sizes(d)
    summ = seed_summary(d, name)
    cells = d[d["metric"] == name].drop_duplicates("cell_id")
    keys = ["method", "bits", "group_size"]
    x = cells.assign(x=cells["cell_id"].map(x_cell)).groupby(keys)["x"].mean()
    summ = summ.groupby(keys).first()  # one setting per method, bits, group
    summ["x"] = x.reindex(summ.index)
    summ = summ.dropna(subset=["x"])
    deployed = d[d["metric"] == "merge/on_grid"].groupby("method")["value"].min()  # 0: not on the grid
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.subplots()
    colors = _colors()
    for method, g in summ.groupby(level="method"):
        color = next(colors)
        hollow = deployed.get(method, 1) == 0 and method not in registry()["sixteen_bit"]
        ax.errorbar(g["x"], g["mean"] * k, yerr=_errors(g, k), fmt="o", capsize=3, color=color,
                    mfc="none" if hollow else color, label=method + (" (+fp adapter)" if hollow else ""))
    grid = summ[[deployed.get(m, 1) != 0 for m in summ.index.get_level_values("method")]].reset_index()
    pts = grid.loc[pareto(grid["x"], grid["mean"] * k, sign)]  # the front of what this axis sizes fully
    ax.plot(pts["x"], pts["mean"] * k, "k--", lw=1, label="Pareto front (on the grid)")
    if M.parse(name).kind == "ppl":
        ax.set_yscale("log")
    unit = M.UNITS.get(M.parse(name).kind, "")
    ax.set(xlabel=xlabel, ylabel=f"{name} ({unit})", title=f"{name} vs size, {d['model'].iloc[0]}")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="major", alpha=0.3)
    return fig


def plot_vs_steps(df: pd.DataFrame, metric: str | None = None, model: str | None = None,
                  stage: str = "final") -> Figure:
    """The budget study: ``metric`` vs ``train.steps`` (log axes), one line per method (mean over seeds,
    95 % interval); methods that do not train (gptq, rtn) as horizontal lines."""
    d = _model(df, model)
    name = _pick(d, metric, stage, QUALITY)
    k = M.scale(name)
    summ = seed_summary(d, name)
    if "train.steps" not in summ:
        raise ValueError("the records do not vary train.steps (a budget study does)")
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    colors = _colors()
    steps = sorted(summ["train.steps"].dropna().unique())
    for method, g in summ.groupby("method"):
        color = next(colors)
        if not trains(method):  # one cell for every budget
            ax.axhline(g["mean"].mean() * k, ls="--", lw=1, color=color, label=f"{method} (no training)")
            continue
        g = g.sort_values("train.steps")
        ax.errorbar(g["train.steps"], g["mean"] * k, yerr=_errors(g, k), marker="o", capsize=3, color=color,
                    label=f"{method} ({_n(g)})")
    if M.parse(name).kind == "ppl":
        ax.set_yscale("log")
        _plain_log(ax.yaxis)
    ax.set_xscale("log")
    ax.set_xticks(steps, [str(int(s)) for s in steps])
    ax.xaxis.set_minor_formatter(NullFormatter())
    unit = M.UNITS.get(M.parse(name).kind, "")
    bars = "95 % interval over seeds" if (summ["n"] >= 2).any() else "one seed: no error bars"
    ax.set(xlabel="training steps (tokens per step unchanged)", ylabel=f"{name} ({unit})",
           title=f"{name} vs budget, {d['model'].iloc[0]} ({bars})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: the lines stay readable
    ax.grid(True, which="both", alpha=0.3)
    return fig


def plot_losses(df: pd.DataFrame, model: str | None = None, bits: int | None = None, smooth: int = 10) -> Figure:
    """Training loss per step at one bit width (default: the middle one) and group size, one curve
    per method (its longest run; the mean over seeds where there are several): a running mean over
    ``smooth`` steps, the raw losses faint behind it."""
    d = _model(df, model)
    losses = df.attrs.get("losses") or {}
    cells = d[d["path"].isin(list(losses))].drop_duplicates("cell_id")
    if cells.empty:
        raise ValueError("no training losses in the records")
    bits = int(np.median(sorted(set(cells["bits"])))) if bits is None else bits  # 2, 3, 4 → 3
    group = cells[cells["bits"] == bits]["group_size"].mode().iloc[0]
    cells = cells[(cells["bits"] == bits) & (cells["group_size"] == group)]
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.subplots()
    colors = _colors()
    lengths = set()
    for method, g in cells.groupby("method"):
        n = max(len(losses[p]) for p in g["path"])
        lengths.add(n)
        runs = np.array([losses[p] for p in g["path"] if len(losses[p]) == n])  # the longest run's seeds
        mean, color = runs.mean(axis=0), next(colors)
        w = min(smooth, n)
        ax.plot(np.arange(1, n + 1), mean, color=color, alpha=0.2, lw=0.8)
        ax.plot(np.arange(w, n + 1), np.convolve(mean, np.ones(w) / w, mode="valid"), color=color,
                label=f"{method} ({n} steps, n={len(runs)})")
    if len(lengths) > 1:
        ax.set_xscale("log")  # curves of different lengths (a budget study: 30 to 300 steps)
    ax.set(xlabel="step", ylabel=f"training loss (running mean of {smooth})",
           title=f"training loss, {d['model'].iloc[0]}, {bits} bits, "
                 f"{'per-channel' if group == -1 else f'g{int(group)}'}")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    return fig


def plot_cost(bench: str | Path | dict) -> Figure:
    """Training cost per method from a ``qexp.bench`` result (``bench.json``): step time and peak memory
    relative to LoRA, at model scale (the bars; the whiskers span the interleaved rounds' step times) and
    at each layer shape (markers): measured side by side, so the ratios hold although absolute times on
    a shared machine do not."""
    b = json.loads(Path(bench).read_text()) if not isinstance(bench, dict) else bench
    model = [r for r in b["scales"].get("model", {}).get("rows", []) if r.get("rounds")]
    if not model:
        raise ValueError("no trained methods in the bench result")
    lora = next((r for r in model if r["method"] == "lora"), None)
    if lora is None:
        raise ValueError("the bench result has no lora row (the reference)")
    model.sort(key=lambda r: np.median([x["step"] for x in r["rounds"]]))
    names = [r["method"] for r in model]
    ref = np.median([x["step"] for x in lora["rounds"]])
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    steps = [np.array([x["step"] for x in r["rounds"]]) / ref for r in model]
    mid = np.array([np.median(v) for v in steps])
    ax1.bar(names, mid, color="tab:blue", alpha=0.7, label=f"model scale ({b['scales']['model']['settings']['model']})")
    ax1.errorbar(names, mid, yerr=[mid - [v.min() for v in steps], [v.max() for v in steps] - mid], fmt="none",
                 color="black", capsize=3)
    ax2.bar(names, [r["peak_mb"] / lora["peak_mb"] for r in model], color="tab:orange", alpha=0.7,
            label="model scale")
    layer = b["scales"].get("layer", {}).get("rows", [])
    for j, shape in enumerate(sorted({tuple(r["shape"]) for r in layer if r.get("x_lora_step")})):
        rows = {r["method"]: r for r in layer if r.get("shape") and tuple(r["shape"]) == shape}
        xs = [i for i, m in enumerate(names) if m in rows]
        for ax, key in ((ax1, "x_lora_step"), (ax2, "x_lora_mem")):
            ax.plot(xs, [rows[names[i]][key] for i in xs], "o^sD"[j % 4], ms=5, ls="none", color=f"C{j + 2}",
                    label=f"layer {shape[0]}×{shape[1]}")
    for ax, what in ((ax1, "training step time"), (ax2, "training peak memory")):
        ax.axhline(1, color="gray", lw=1, ls=":")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.set_ylabel(f"{what}, × LoRA (log)")
        ax.tick_params(axis="x", rotation=35)
        ax.legend(fontsize=7)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.suptitle(f"qexp.bench, {b.get('date', '')}: {b['machine'].get('device', '')}, "
                 f"{b['machine'].get('cpu_count', '?')} cores", fontsize=9)
    return fig


def save_plots(df: pd.DataFrame, out: str | Path, model: str | None = None,
               bench: str | Path | None = None) -> list[Path]:
    """Every plot the records allow, as PNG in ``out`` (the cost plot from ``bench``, a ``qexp.bench``
    result, when given); returns the paths (plots without data are skipped)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = [("metric_vs_bits", lambda: plot_vs_bits(df, model=model)),
             ("pareto", lambda: plot_pareto(df, model=model)),
             ("metric_vs_steps", lambda: plot_vs_steps(df, model=model)),
             ("losses", lambda: plot_losses(df, model=model))]
    if bench:
        plots.append(("cost", lambda: plot_cost(bench)))
    paths = []
    for fname, fn in plots:
        try:
            fig = fn()
        except ValueError as e:
            log.warning("plot %s skipped: %s", fname, e)
            continue
        fig.savefig(out / f"{fname}.png", dpi=120)
        paths.append(out / f"{fname}.png")
    return paths
