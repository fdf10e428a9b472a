"""Analysis of qexp records: tidy DataFrame, the papers' tables beside ours, plots, W&B tables.

    from qexp import analysis
    res = analysis.load("results/my_sweep")        # res.df: one row per cell × metric; res.failed
    t = analysis.table(res.df, "lota_t1")          # t.frame(), t.markdown(), t.latex(), t.ordering
    analysis.save_plots(res.df, "results/my_sweep/analysis")
    analysis.log_table(t, project="qexp", group="my_sweep")   # a wandb.Table (offline by default)

CLI: ``python -m qexp.analysis results/<sweep> --table lota_t1`` (``--list`` shows the tables);
``--compare ppl/wikitext_sample --baseline rtn``: one metric as a method × bits grid, base → final.
Uncertainty (:mod:`.uncertainty`): ``seed_summary(res.df, metric)`` gives mean, std, n and a 95 %
interval per setting (cells that differ only in seed); tables show ``mean ± CI`` and call each paper
ordering holds / flips / unresolved.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .compare import compare, compare_markdown
from .load import Results, load, wide
from .metrics import direction, parse
from .plots import plot_cost, plot_losses, plot_pareto, plot_vs_bits, plot_vs_steps, save_plots
from .tables import Table, list_tables, paper_values, table
from .uncertainty import Cells, MixedSettings, pairwise, seed_summary, stability

__all__ = ["Cells", "MixedSettings", "Results", "Table", "compare", "compare_markdown", "direction",
           "flat", "list_tables", "load", "log_table", "pairwise", "paper_values", "parse",
           "plot_cost", "plot_losses", "plot_pareto", "plot_vs_bits", "plot_vs_steps", "save_plots", "seed_summary",
           "stability", "table", "wide"]


def flat(df: pd.DataFrame) -> pd.DataFrame:
    """Index reset, MultiIndex columns joined with ``|``, missing values as None (for CSV / W&B)."""
    out = df.reset_index() if df.index.names != [None] else df.copy()
    out.columns = ["|".join(str(p) for p in c if p != "") if isinstance(c, tuple) else str(c) for c in out.columns]
    return out.astype(object).where(out.notna(), None)


def log_table(data: pd.DataFrame | Table, project: str = "qexp", group: str | None = None, name: str = "table",
              mode: str = "offline", entity: str | None = None, dir: str | Path | None = None) -> str:
    """Log ``data`` (a DataFrame, or a :class:`Table` as shown: ``ours [paper]`` cells and notes) as a
    ``wandb.Table`` in its own run (job_type ``analysis``, grouped with the sweep's cell runs).
    Returns the run directory (``wandb sync <dir>`` uploads an offline run)."""
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    notes = None
    if isinstance(data, Table):
        notes, name, data = "\n".join(data.notes), data.name if name == "table" else name, data.display()
    run = wandb.init(project=project, entity=entity, group=group, job_type="analysis", mode=mode,
                     name=f"{group or 'analysis'}-{name}", dir=str(dir) if dir else None, notes=notes,
                     config={"table": name}, reinit="finish_previous",
                     settings=wandb.Settings(console="off", save_code=False, x_disable_stats=True))
    try:
        run.log({name: wandb.Table(dataframe=flat(data))})
    finally:
        run.finish()
    return str(Path(run.dir).parent)
