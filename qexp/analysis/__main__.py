"""``python -m qexp.analysis results/<sweep> [results/<other sweep> ...] [--table lota_t1 ...] [--seeds METRIC]``.

Prints the cells and the requested paper tables (``mean ± CI [paper]``; orderings hold / flip /
unresolved), and writes next to them (``--out``, default ``<results>/analysis``): ``records.csv``
(tidy), ``cells.csv``, ``<table>.md/.tex/.csv``, ``seeds_<metric>.md`` and the plots (PNG).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from . import flat, list_tables, load, log_table, save_plots, table, uncertainty, wide
from .compare import compare, compare_markdown
from .metrics import parse
from .tables import registry, runnable
from .uncertainty import MixedSettings, seeds_markdown


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qexp.analysis", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="*",
                   help="results dir(s), W&B export (.csv/.json/.jsonl) or wandb:<entity>/<project>")
    p.add_argument("--table", action="append", default=[], help="paper table to fill (repeatable; 'all')")
    p.add_argument("--list", action="store_true", help="list the paper tables and exit")
    p.add_argument("--runnable", metavar="PAPER",
                   help="share of PAPER's rows (e.g. QWHA; all: the whole CSV) whose method qexp runs")
    p.add_argument("--paper-model", help="the paper's model to compare with (default: the table's reference)")
    p.add_argument("--compare", action="append", default=[], metavar="METRIC",
                   help="method x bits grid of METRIC (e.g. ppl/wikitext_sample), base -> final (repeatable)")
    p.add_argument("--baseline", help="with --compare: say whether each method's final value beats this method's")
    p.add_argument("--seeds", action="append", default=[], metavar="METRIC",
                   help="per setting: mean, std, n and 95 %% interval over seeds, and every pair of methods with "
                        "its difference, interval and verdict (e.g. ppl/wikitext_sample; repeatable)")
    p.add_argument("--along", default="method", metavar="KEY",
                   help="with --seeds: pair settings that differ only in KEY (default: method; a study's axis, "
                        "e.g. method.phi, compares its values within each method)")
    p.add_argument("--min-seeds", type=int, default=2,
                   help="seeds an ordering needs before it can hold or flip (default 2: never on one seed; 1: one "
                        "seed with per-window data is judged over the windows / items alone)")
    p.add_argument("--stage", default="final", help="record stage for our numbers (default: final)")
    p.add_argument("--out", help="output directory (default: <source>/analysis)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--bench", help="a qexp.bench result (bench.json) for the cost plot "
                                   "(default: results/bench/bench.json when it exists)")
    p.add_argument("--wandb", action="store_true", help="log the tables as wandb.Table (group = the sweep)")
    p.add_argument("--project", default="qexp")
    p.add_argument("--entity")
    p.add_argument("--wandb-mode", default="offline", choices=["offline", "online"])
    a = p.parse_args(argv)
    if a.list:
        print(list_tables().to_string(index=False))
        return 0
    if a.runnable:
        n, total, missing = runnable(a.runnable)
        print(f"{a.runnable}: {n}/{total} rows ({100 * n / max(total, 1):.1f} %) name a method qexp runs"
              + (f"; not: {', '.join(missing)}" if missing else ""))
        return 0
    if not a.source:
        p.error("a results source is required (or --list)")
    names = list(registry()["tables"]) if "all" in a.table else a.table
    for n in names:
        if n not in registry()["tables"]:
            p.error(f"--table {n!r} is not defined; choose one of: {', '.join(registry()['tables'])}, all")
    if a.min_seeds < 1:
        p.error(f"--min-seeds={a.min_seeds}: must be 1 or more")
    uncertainty.MIN_SEEDS = a.min_seeds
    res = load(a.source[0] if len(a.source) == 1 else a.source)
    print(res)
    for status, rows in res.failed.groupby("status", sort=True):
        resume = status == "preempted"
        print(f"{status} (left out{'; rerun the sweep to resume them' if resume else ''}):")
        print(rows[["method", "bits", "resume" if resume else "error", "path"]].to_string(index=False))
    if len(res.warnings):
        print("warnings (kept in; the final model is degenerate):")
        print(res.warnings[["method", "bits", "warning", "path"]].to_string(index=False))
    src = Path(a.source[0])
    out = Path(a.out) if a.out else (src if src.is_dir() else Path(".")) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    flat(res.df).to_csv(out / "records.csv", index=False)
    cells = wide(res.df, a.stage)
    cells.to_csv(out / "cells.csv", index=False)
    sweeps = sorted(set(res.df["sweep"].dropna())) if len(res.df) else []
    group = sweeps[0] if len(sweeps) == 1 else src.name
    for metric in a.compare:
        try:
            grid = compare(res.df, metric, a.baseline)
        except KeyError as e:
            p.error(str(e.args[0]))
        md = compare_markdown(grid, metric)
        print("\n" + md)
        (out / f"compare_{metric.replace('/', '_')}.md").write_text(md)
    for metric in a.seeds:
        try:
            md = seeds_markdown(res.df, metric if parse(metric).stage else f"{metric}/{a.stage}", along=a.along)
        except KeyError as e:
            p.error(str(e.args[0]))
        print("\n" + md)
        (out / f"seeds_{metric.replace('/', '_')}.md").write_text(md)
    for n in names:
        try:
            t = table(res.df, n, a.paper_model, a.stage)
        except (KeyError, MixedSettings) as e:
            p.error(str(e.args[0]))
        md = t.markdown()
        print("\n" + md)
        (out / f"{n}.md").write_text(md)
        (out / f"{n}.tex").write_text(t.latex())
        flat(t.frame()).to_csv(out / f"{n}.csv", index=False)
        if a.wandb:
            print(f"W&B: {n} -> {log_table(t, a.project, group, mode=a.wandb_mode, entity=a.entity, dir=out)}")
    if a.wandb and not names:
        print(f"W&B: cells -> {log_table(cells, a.project, group, 'cells', a.wandb_mode, a.entity, dir=out)}")
    if not a.no_plots and len(res.df):
        bench = a.bench or next((b for b in [Path("results/bench/bench.json")] if b.exists()), None)
        for path in save_plots(res.df, out, bench=bench):
            print(f"plot: {path}")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
