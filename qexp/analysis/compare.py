"""One metric of a sweep as a method × bits grid: base → final, and whether each method beats a baseline."""

from __future__ import annotations

import pandas as pd

from .metrics import direction
from .tables import fmt


def compare(df: pd.DataFrame, metric: str = "ppl/wikitext_sample", baseline: str | None = None) -> pd.DataFrame:
    """Rows ``(method, group_size)``, columns ``(bits, base|final|vs <baseline>)``; a metric without
    stages (``merge/max_abs_logit_diff``, ``time/train_s``) gets one ``value`` column per bit width.

    ``vs <baseline>`` is True where the method's final value is better than the baseline
    method's final value at the same bits and group size (direction from ``metrics``)."""
    rows = df[df["metric"].isin([f"{metric}/base", f"{metric}/final"])]
    last = "final"
    if rows.empty:
        rows, last = df[df["metric"] == metric].assign(stage="value"), "value"
    if rows.empty:
        have = sorted({m.rsplit("/", 1)[0] for m in df["metric"]} | set(df["metric"]))
        raise KeyError(f"metric {metric!r} has no values here; available: {', '.join(have)}")
    keys = ["method", "group_size", *varying(rows)]
    # cells that differ only in seed: their mean (seed_summary gives std, n and the interval)
    t = rows.pivot_table(index=keys, columns=["bits", "stage"], values="value", aggfunc="mean", dropna=False)
    t = t.dropna(how="all")
    if baseline:
        if baseline not in set(t.index.get_level_values("method")):
            methods = ", ".join(sorted(set(rows["method"])))
            raise KeyError(f"baseline {baseline!r} has no cells here; methods: {methods}")
        sign = direction(metric) or -1
        own = t.index.get_level_values("method") == baseline
        for b in sorted(t.columns.get_level_values(0).unique()):
            if (b, last) not in t:
                continue
            # the baseline's final value per group size (its first variant if it has several)
            ref = t[(b, last)].xs(baseline, level="method").groupby(level="group_size").first()
            base = t.index.get_level_values("group_size").map(ref)
            t[(b, f"vs {baseline}")] = (sign * (t[(b, last)] - base) > 0).where(base.notna() & ~own)
    order = ("base", "final", "value")
    return t.reindex(columns=sorted(t.columns, key=lambda c: (c[0], order.index(c[1]) if c[1] in order else 3)))


def varying(rows: pd.DataFrame) -> list[str]:
    """Config columns that differ between cells of the same method, group size and bits (e.g. an
    lr sweep): they become row keys, so different cells never collapse into one."""
    cols = [c for c in rows.columns if "." in c and not c.startswith(("eval.", "data.", "model."))]
    cells = rows.drop_duplicates("cell_id")
    out = []
    for c in cols:
        vals = cells[c].astype(str)
        if vals.groupby([cells["method"], cells["group_size"], cells["bits"]]).nunique().max() > 1:
            out.append(c)
    return out


def compare_markdown(t: pd.DataFrame, metric: str) -> str:
    """The grid as a Markdown table (``base → final`` per bit width)."""
    bits = sorted(t.columns.get_level_values(0).unique())
    staged = any(c[1] in ("base", "final") for c in t.columns)
    extra = {b: [c[1] for c in t.columns if c[0] == b and c[1] not in ("base", "final", "value")] for b in bits}
    extra_keys = list(t.index.names[2:])
    head = ["method", "group", *extra_keys]
    head += [h for b in bits for h in [f"W{b} base → final" if staged else f"W{b}", *(f"W{b} {e}" for e in extra[b])]]
    lines = [f"{metric} (lower is better)" if direction(metric) == -1 else metric, "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (method, gs, *more), r in t.iterrows():
        cells = [method, "per-channel" if gs == -1 else str(gs), *map(str, more)]
        for b in bits:
            value = f"{fmt(r.get((b, 'base')))} → {fmt(r.get((b, 'final')))}" if staged else fmt(r.get((b, "value")))
            cells.append(value)
            cells += ["" if pd.isna(r.get((b, e))) else ("yes" if r.get((b, e)) else "no") for e in extra[b]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
