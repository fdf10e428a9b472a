"""Plots from the tidy records (matplotlib ``Figure`` objects, no global pyplot state): a metric vs bits
per method, accuracy vs model size (Pareto front), and training time / peak memory per method."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from . import metrics as M
from .tables import registry

log = logging.getLogger("qexp")
# Default metric per plot: the first one the records have (without the stage).
QUALITY = ("ppl/wikitext2", "ppl/wikitext_sample", "acc/mmlu5", "acc/csqa7", "acc/csqa6", "acc/mmlu5_offline",
           "acc/csqa7_offline", "ppl/c4", "ppl/xsum")
ACCURACY = tuple(m for m in QUALITY if m.startswith("acc")) + tuple(m for m in QUALITY if m.startswith("ppl"))


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


def plot_vs_bits(df: pd.DataFrame, metric: str | None = None, model: str | None = None,
                 stage: str = "final") -> Figure:
    """``metric`` vs bits, one line per method (mean ± std over its cells, e.g. seeds) at the most common
    group size; 16-bit methods and the fp model as horizontal lines."""
    d = _model(df, model)
    name = _pick(d, metric, stage, QUALITY)
    k = M.scale(name)
    quant = d[~d["method"].isin(registry()["sixteen_bit"]) & (d["metric"] == name)]
    group = quant["group_size"].mode().iloc[0] if len(quant) else None
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    colors = iter(colormaps["tab20"].colors)
    for method, g in d[d["metric"] == name].groupby("method"):
        if method in registry()["sixteen_bit"]:
            ax.axhline(g["value"].mean() * k, ls="--", lw=1, color="gray", label=f"{method} (16-bit)")
            continue
        s = g[g["group_size"] == group].groupby("bits")["value"].agg(["mean", "std"]).sort_index() * k
        if len(s):
            ax.errorbar(s.index.astype(int), s["mean"], yerr=s["std"].fillna(0), marker="o", capsize=3,
                        label=method, color=next(colors))
    m = M.parse(name)
    fp = d[d["metric"] == f"{m.kind}/{m.target}/fp"]["value"]
    if len(fp):
        ax.axhline(fp.mean() * k, ls=":", color="black", label="fp16 (unquantized)")
    if m.kind == "ppl":
        ax.set_yscale("log")
    ax.set_xticks(sorted(d["bits"].dropna().unique().astype(int)))
    ax.set(xlabel="bits", ylabel=f"{m.kind}/{m.target} ({M.UNITS.get(m.kind, '')})",
           title=f"{name} vs bits, {d['model'].iloc[0]}"
                 + ("" if group is None else f", {'per-channel' if group == -1 else f'g{int(group)}'}"))
    ax.legend(fontsize=8)
    return fig


def sizes(d: pd.DataFrame) -> tuple[pd.Series, str]:
    """Per cell: model size in bytes from the records, or (when no record has one) an estimate in bits per
    weight: bits + 32/group_size (an fp16 scale and zero per group), 16 for 16-bit methods."""
    for s in M.SIZE_METRICS:
        hit = d[d["metric"] == s]
        if len(hit):
            return hit.groupby("cell_id")["value"].mean(), "model size (bytes)"
    cells = d.drop_duplicates("cell_id").set_index("cell_id")
    g = cells["group_size"].astype(float)
    bpw = cells["bits"].astype(float) + np.where(g > 0, 32 / g.where(g > 0, 1), 0)
    bpw = bpw.where(~cells["method"].isin(registry()["sixteen_bit"]), 16.0)
    return bpw, "bits per weight (estimated: no size in the records)"


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
    """Quality (default: an accuracy) vs model size, one marker per cell, the Pareto front as a line."""
    d = _model(df, model)
    name = _pick(d, metric, stage, ACCURACY)
    y = d[d["metric"] == name].groupby("cell_id")["value"].mean() * M.scale(name)
    x, xlabel = sizes(d)
    x = x.reindex(y.index).dropna()
    y = y.reindex(x.index)
    meta = d.drop_duplicates("cell_id").set_index("cell_id").loc[x.index]
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for method, idx in meta.groupby("method").groups.items():
        ax.scatter(x[idx], y[idx], label=method)
        for i in idx:
            ax.annotate(f"w{meta.at[i, 'bits']}", (x[i], y[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    f = pareto(x, y, M.direction(name) or 1)
    ax.plot(x[f], y[f], "k--", lw=1, label="Pareto front")
    unit = M.UNITS.get(M.parse(name).kind, "")
    ax.set(xlabel=xlabel, ylabel=f"{name} ({unit})", title=f"{name} vs size, {meta['model'].iloc[0]}")
    ax.legend(fontsize=8)
    return fig


def plot_cost(df: pd.DataFrame, model: str | None = None) -> Figure:
    """Training time and peak memory per method (mean over cells), bars grouped by bits."""
    d = _model(df, model)
    mem = "mem/cuda_peak_mb" if (d["metric"] == "mem/cuda_peak_mb").any() else "mem/peak_rss_mb"
    panels = [(n, lab) for n, lab in (("time/train", "training time (s)"), (mem, f"{mem} (MB)"))
              if (d["metric"] == n).any()]
    if not panels:
        raise ValueError("no time/train or memory metrics in the records")
    fig = Figure(figsize=(5 * len(panels), 4), layout="constrained")
    for ax, (name, label) in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels, strict=True):
        p = d[d["metric"] == name].pivot_table(index="method", columns="bits", values="value", aggfunc="mean")
        width = 0.8 / max(len(p.columns), 1)
        for j, b in enumerate(p.columns):
            ax.bar(np.arange(len(p)) + j * width, p[b].fillna(0), width, label=f"w{b}")
        ax.set_xticks(np.arange(len(p)) + 0.4 - width / 2, p.index, rotation=30)
        ax.set(ylabel=label, title=label)
        ax.legend(fontsize=8)
    return fig


def save_plots(df: pd.DataFrame, out: str | Path, model: str | None = None) -> list[Path]:
    """Every plot the records allow, as PNG in ``out``; returns the paths (plots without data are skipped)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fname, fn in (("metric_vs_bits", plot_vs_bits), ("pareto", plot_pareto), ("cost", plot_cost)):
        try:
            fig = fn(df, model=model)
        except ValueError as e:
            log.warning("plot %s skipped: %s", fname, e)
            continue
        fig.savefig(out / f"{fname}.png", dpi=120)
        paths.append(out / f"{fname}.png")
    return paths
