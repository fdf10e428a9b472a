"""The papers' tables, filled from records: ours beside the paper's number, and whether the paper's
ordering between methods holds in ours. The tables are data (``tables.yaml``); the paper's numbers are
``paper_tables.csv`` (2,109 values from the five papers)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from itertools import combinations

import numpy as np
import pandas as pd
import yaml

from ..config import CONF
from . import metrics as M
from . import uncertainty as U


@cache
def registry() -> dict:
    """``tables.yaml``: model and method names, and the table specs."""
    return yaml.safe_load(resources.files(__package__).joinpath("tables.yaml").read_text())


def _group(s: str) -> float:
    s = str(s)
    if "per-channel" in s:
        return -1
    m = re.match(r"-?\d+", s)
    return float(m.group()) if m else np.nan


@cache
def paper_values() -> pd.DataFrame:
    """The CSV, with numeric ``bits_n`` (``4+16`` → 4), ``group_n`` (per-channel → -1) and ``value_f``."""
    with resources.files(__package__).joinpath("paper_tables.csv").open() as f:
        df = pd.read_csv(f, dtype=str, keep_default_na=False)
    df["bits_n"] = pd.to_numeric(df["bits"].str.extract(r"^(\d+)")[0], errors="coerce")
    df["group_n"] = df["group_size"].map(_group)
    # the leading number: "5.77 ± 0.02" → 5.77, "13.7*" → 13.7, "1.9x" → 1.9; "X", "OOM" → NaN
    df["value_f"] = pd.to_numeric(df["value"].str.extract(r"^\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")[0],
                                  errors="coerce")
    return df


def spec(name: str) -> dict:
    tables = registry()["tables"]
    if name not in tables:
        raise KeyError(f"table={name!r} is not defined; choose one of: {', '.join(tables)}")
    return tables[name]


def list_tables() -> pd.DataFrame:
    """Name, paper, table, title and reference model of every table in the registry."""
    return pd.DataFrame([{"name": k, "paper": s["paper"], "table": s["table"], "paper_model": s["paper_model"],
                          "title": s["title"]} for k, s in registry()["tables"].items()])


def fmt(v: float) -> str:
    if v is None or pd.isna(v):
        return "–"
    return f"{v:.3g}" if abs(v) >= 1000 or 0 < abs(v) < 0.01 else f"{v:.2f}"


@dataclass
class Table:
    """A filled table: ``values`` (long: row, column, method, ours, paper), ``ordering`` (one row per
    method pair and column), ``notes`` (what the reader must know), and wide / Markdown / LaTeX views."""

    name: str
    spec: dict
    values: pd.DataFrame
    ordering: pd.DataFrame
    notes: list[str]

    @property
    def keys(self) -> list[str]:
        return [*self.spec["rows"], "paper_model"]

    def direction(self) -> pd.Series:
        """Per row: how many of the paper's method orderings hold, flip or are unresolved in ours (95 %
        intervals, :mod:`.uncertainty`), which flip, and how many agree by point estimate alone."""
        groups = {k: g for k, g in self.ordering.groupby(self.keys, sort=False)}
        out = {}
        for key in self.values[self.keys].drop_duplicates().itertuples(index=False, name=None):
            o = groups.get(key)
            if o is None:
                out[key] = "no pair with both values"
                continue
            count = o["verdict"].value_counts()
            s = (f"{count.get('holds', 0)} hold, {count.get('flips', 0)} flip, "
                 f"{count.get('unresolved', 0)} unresolved of {len(o)}")
            flips = o[o["verdict"] == "flips"]
            if len(flips):
                shown = [f"{r.better} vs {r.worse} ({r.column})" for r in flips.head(3).itertuples()]
                s += "; flips: " + ", ".join(shown) + (f", +{len(flips) - 3} more" if len(flips) > 3 else "")
            s += f"; point estimates in the paper's order: {int(o['agrees'].sum())}/{len(o)}"
            out[key] = s
        return pd.Series(out, name="direction").rename_axis(self.keys)

    def frame(self) -> pd.DataFrame:
        """Rows: the row keys and paper model; columns: (column, method, ours|paper) and ``direction``."""
        v = self.values.set_index([*self.keys, "column", "method"])[["ours", "paper"]]
        w = v.unstack(["column", "method"]).reorder_levels([1, 2, 0], axis=1)
        order = [(c["label"], m, s) for c in self.spec["columns"] for m in self.spec["methods"]
                 for s in ("ours", "paper")]
        w = w.reindex(columns=pd.MultiIndex.from_tuples(order, names=["column", "method", "source"]))
        w[("direction", "", "")] = self.direction()
        return w

    def display(self) -> pd.DataFrame:
        """Strings ``ours ± half-width of its 95 % interval [paper]`` per (column, paper label); row keys
        as columns."""
        f = self.frame()
        plain = self.values[[not any(m in c.get("labels", {}) for c in self.spec["columns"] if c["label"] == col)
                             for col, m in zip(self.values["column"], self.values["method"], strict=True)]]
        labels = dict(zip(plain["method"], plain["label"], strict=False))
        shared = {lab for lab in labels.values() if lab and list(labels.values()).count(lab) > 1}
        labels = {m: f"{lab} ({m})" if lab in shared else lab for m, lab in labels.items()}  # gptq, gptq_magr
        proxy = self.values.set_index([*self.keys, "column"])["proxy"]
        proxy = proxy[~proxy.index.duplicated()]

        ci = self.values.set_index([*self.keys, "column", "method"])[["ours_low", "ours_high"]]

        def cell(key: tuple, col: str, m: str, o: float, p: float) -> str:
            mark = "ppl " if proxy.get((*key, col), False) and not pd.isna(o) else ""
            lo, hi = ci.loc[(*key, col, m)] if (*key, col, m) in ci.index else (np.nan, np.nan)
            return f"{mark}{U.pm(o, lo, hi, fmt)} [{fmt(p)}]"

        own = {(c["label"], m): lab for c in self.spec["columns"] for m, lab in c.get("labels", {}).items()}
        out = pd.DataFrame({f"{c['label']}: {own.get((c['label'], m)) or labels.get(m) or m + ' (not in paper)'}":
                            [cell(k if isinstance(k, tuple) else (k,), c["label"], m, o, p)
                             for k, o, p in zip(f.index, f[(c["label"], m, "ours")], f[(c["label"], m, "paper")],
                                                strict=True)]
                            for c in self.spec["columns"] for m in self.spec["methods"]}, index=f.index)
        out["direction"] = f[("direction", "", "")]
        out = out.reset_index()
        if "group_size" in out:
            out["group_size"] = out["group_size"].map(lambda g: "per-channel" if g == -1 else g)
        return out

    def ratios(self) -> pd.DataFrame:
        """Each method's value over the ``ratio_to`` method's, ours and the paper's, per row and column
        (QWHA Table 5: training times on different hardware and models compare as ratios)."""
        ref, on = self.spec["ratio_to"], [*self.keys, "column"]
        base = self.values[self.values["method"] == ref].set_index(on)[["ours", "paper"]]
        v = self.values[self.values["method"] != ref].join(base, on=on, rsuffix="_ref")
        return v.assign(ours=v["ours"] / v["ours_ref"], paper=v["paper"] / v["paper_ref"])[[*on, "method", "ours",
                                                                                              "paper"]]

    def markdown(self) -> str:
        d = self.display()
        lines = [f"**{self.spec['paper']} {self.spec['table']}** ({self.name}): {self.spec['title']}", ""]
        lines += [f"- {n}" for n in self.notes] + [""]
        lines.append("| " + " | ".join(map(str, d.columns)) + " |")
        lines.append("|" + "---|" * len(d.columns))
        lines += ["| " + " | ".join(map(str, r)) + " |" for r in d.itertuples(index=False)]
        if self.spec.get("ratio_to"):
            r = self.ratios()
            r = r.assign(cell=[f"{o:.2f}× [{p:.2f}×]" if o == o else f"– [{p:.2f}×]" for o, p in
                               zip(r["ours"], r["paper"], strict=True)])
            w = r.pivot_table(index=[*self.keys, "method"], columns="column", values="cell", aggfunc="first",
                              sort=False)
            w = w[[c["label"] for c in self.spec["columns"] if c["label"] in w]].reset_index()
            lines += ["", f"Each method over {self.spec['ratio_to']}, ours [paper]:", "",
                      "| " + " | ".join(map(str, w.columns)) + " |", "|" + "---|" * len(w.columns)]
            lines += ["| " + " | ".join(map(str, x)) + " |" for x in w.itertuples(index=False)]
        return "\n".join(lines) + "\n"

    def latex(self) -> str:
        d = self.display()
        head = "\n".join(f"% {n}" for n in self.notes)
        caption = f"{self.spec['paper']} {self.spec['table']}: ours [paper]"
        return head + "\n" + d.to_latex(index=False, escape=True, caption=caption, label=f"tab:{self.name}")


def _paper_model(model: str, csv: pd.DataFrame, ref: str) -> str:
    for alias in registry()["models"].get(model) or []:
        if (csv["model"] == alias).any():
            return alias
    return ref


def _label(method: str, csv: pd.DataFrame) -> str | None:
    return next((a for a in registry()["methods"].get(method, []) if (csv["method"] == a).any()), None)


def _ours(recs: list, row: dict, method: str, col: dict, sp: dict, stage: str,
          units: dict) -> tuple[float, str | None, int, U.Cells | None]:
    """Mean of our metric for this row and method over its seeds (×100 for accuracies), the metric
    name, the cell count and the cells (seed, value, units) for the interval. ``recs``: the tidy rows
    as tuples (plain Python filtering: far faster than DataFrame masks here)."""
    fixed = [] if method in registry()["sixteen_bit"] else [k for k in ("bits", "group_size") if k in row]
    sel = [r for r in recs if r.model == row["model"] and method in ("fp16", r.method)
           and all(getattr(r, k) == row[k] for k in fixed)]
    stages = ["fp"] if method == "fp16" else list(dict.fromkeys([sp.get("stages", {}).get(method, stage), stage]))
    have = {r.metric for r in sel}
    # stage-less metrics (time/…, init/…) after the staged ones
    name = next((n for st in [*stages, None] if (n := M.pick(have, col["ours"], st))), None)
    if name is None:
        return np.nan, None, 0, None
    hit = [r for r in sel if r.metric == name]
    sweeps = list(dict.fromkeys(r.sweep for r in hit))  # a table over several sweeps (QWHA Table 3: CSQA
    if len(sweeps) > 1:  # and GSM8K fine-tuning): each value from one, the first the table lists
        order = list(sp.get("sweeps", []))
        first = min(sweeps, key=lambda w: order.index(w) if w in order else len(order))
        hit = [r for r in hit if r.sweep == first]
    per_seed = {}  # one cell per seed (fp16: every cell's fp stage is the same model; the first stands for it)
    for r in hit:
        per_seed.setdefault(r.seed, r)
    cells = U.Cells(name, list(per_seed), [r.value for r in per_seed.values()],
                    [units.get(r.path, {}).get(name) for r in per_seed.values()])
    return cells.mean() * M.scale(name), name, len({r.cell_id for r in hit}), cells


def _paper(csv: list, pm: str, label: str | None, row: dict, col: dict, sp: dict) -> tuple[float, float]:
    """The paper's value for this row, method and column, and the paper's group size it came from."""
    prefixes = tuple(col["paper"])
    c = [r for r in csv if r.model == pm and r.method == label and r.dataset_or_task.startswith(prefixes)
         and r.metric == col.get("metric", r.metric)]  # a column may also name the CSV's metric
    if "bits" in row:
        at = [r for r in c if r.bits_n == row["bits"]]
        if not at and sp.get("paper_bits"):  # a table the paper gives at one bit width only (QWHA Tables 2, 5, 13)
            at = [r for r in c if r.bits_n == sp["paper_bits"]]
        if not at:  # 16-bit rows (FP16, LoRA) stand beside every bit width
            at = [r for r in c if r.bits_n == 16]
            return (at[0].value_f, np.nan) if at else (np.nan, np.nan)
        c = at
    g = row.get("group_size")
    for pref in ([g] if g == -1 else [g, sp.get("paper_group")]):
        if pref is not None and any(r.group_n == pref for r in c):
            c = [r for r in c if r.group_n == pref]
            break
    else:
        if "group_size" in sp["rows"]:  # never show a per-channel number in a grouped row or vice versa
            return np.nan, np.nan
    return (c[0].value_f, c[0].group_n) if c else (np.nan, np.nan)


def runnable(paper: str | None = None) -> tuple[int, int, list[str]]:
    """How many of ``paper``'s rows in the CSV (every row: ``None`` or ``"all"``) name a method qexp can
    run (a registered method, a variant of one, or the unquantized model), the row count, and the
    method labels it cannot run."""
    from ..methods import registry as methods

    reg, names = registry(), set(methods())
    ok = {"fp16", *names} | {v for v, s in reg.get("variants", {}).items() if s["method"] in names}
    labels = {a for m, aliases in reg["methods"].items() if m in ok for a in aliases or []}
    rows = paper_values()
    rows = rows if paper in (None, "all") else rows[rows["paper"] == paper]
    hit = rows["method"].isin(labels)
    return int(hit.sum()), len(rows), sorted(set(rows.loc[~hit, "method"]))


@cache
def method_default(method: str, key: str) -> object:
    """``key`` (``method.init``) in ``conf/method/<method>.yaml``, the value a record without it ran with."""
    path = CONF / "method" / f"{method}.yaml"
    node = yaml.safe_load(path.read_text()) if path.exists() else {}
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def variants(df: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """Cells of a method run with a variant's config (``tables.yaml`` ``variants``, e.g. ``qwha_dct``:
    qwha with ``method.transform=dct``) are that variant's, not the method's, in tables that list it.
    A record from before the key existed (NaN) ran with the method's default (``method_default``)."""
    spec_ = registry().get("variants", {})
    df = df.copy()
    for v in names:
        if v not in spec_:
            continue
        method = spec_[v]["method"]
        hit = df["method"] == method
        for key, val in spec_[v].get("config", {}).items():
            default = method_default(method, key)
            got = df[key] if key in df else pd.Series(np.nan, index=df.index)
            got = got.astype(object).where(got.notna(), default)
            if isinstance(val, int | float) and not isinstance(val, bool):  # 1 == 1.0: a column with NaN
                hit &= pd.to_numeric(got, errors="coerce") == val  # elsewhere in the records is float
            else:
                hit &= got.astype(str) == str(val)
        df.loc[hit, "method"] = v
    return df


def ordering(values: pd.DataFrame, sp: dict, keys: list[str], draws: int = U.B) -> pd.DataFrame:
    """For each row and column, every pair of methods with ours and paper values: the paper's better
    method (by the metric's direction) minus the worse one in ours (positive: the paper's order), its
    95 % interval over seeds and eval units (:mod:`.uncertainty`) and the verdict: holds / flips /
    unresolved. ``agrees``: the point estimates alone are in the paper's order. Ties in the paper are skipped."""
    out = []
    for key, g in values.groupby([*keys, "column"], sort=False):
        key, col = key[:-1], key[-1]
        sign = g["sign"].iloc[0]
        g = g.dropna(subset=["ours", "paper"]).set_index("method")
        for a, b in combinations([m for m in sp["methods"] if m in g.index], 2):
            dp = sign * (g.at[a, "paper"] - g.at[b, "paper"])
            if dp == 0 or not sign:
                continue
            better, worse = (a, b) if dp > 0 else (b, a)
            # ours may be a proxy metric with its own direction (perplexity where the paper has accuracy)
            so = g.at[better, "sign_ours"]
            do = so * (g.at[better, "ours"] - g.at[worse, "ours"])
            c = U.compare(g.at[better, "cells"], g.at[worse, "cells"], so, draws)
            k = M.scale(g.at[better, "ours_metric"])
            out.append({**dict(zip(keys, key, strict=True)), "column": col, "better": better, "worse": worse,
                        "paper_diff": abs(dp), "ours_diff": do, "ci_low": c["ci_low"] * k, "ci_high": c["ci_high"] * k,
                        "n_better": c["n_better"], "n_worse": c["n_worse"], "basis": c["basis"],
                        "verdict": c["verdict"], "holds": c["verdict"] == "holds", "agrees": bool(do > 0)})
    cols = [*keys, "column", "better", "worse", "paper_diff", "ours_diff", "ci_low", "ci_high", "n_better",
            "n_worse", "basis", "verdict", "holds", "agrees"]
    return pd.DataFrame(out, columns=cols)


def check_seeds(df: pd.DataFrame, keys: list[str], table: str, methods: list[str], by_sweep: bool = False,
                in_metric: tuple[str, ...] = ()) -> None:
    """Cells of ``methods`` averaged into one table cell must differ only in ``seed``: otherwise say
    which config keys differ (and their values) instead of averaging them
    (:class:`.uncertainty.MixedSettings`). 16-bit methods are exempt (their rows span bit widths).
    ``by_sweep``: the cells are the table's own sweeps, different settings by design (QWHA Table 3's
    Alpaca and GSM8K fine-tuning), checked one sweep at a time (a value never averages two: :func:`_ours`).
    ``in_metric``: config keys the columns' metrics already name (QWHA Table 5: ``time/train_step_b<batch>``
    per ``train.batch_size``), so cells that differ in them never meet in one value."""
    sixteen = registry()["sixteen_bit"]
    cells = df[df["method"].isin(methods) & ~df["method"].isin(sixteen)].drop_duplicates("cell_id")
    by = ["model", "method", *(k for k in ("bits", "group_size") if k in keys), *(["sweep"] if by_sweep else [])]
    cols = [c for c in cells.columns if ("." in c or c in ("bits", "group_size", "dataset")) and c not in in_metric]
    for key, g in cells.groupby(by, dropna=False):
        if len(g) < 2:
            continue
        diff = U.differing(g[[c for c in cols if c not in by]], U.trains(key[1]))
        if diff:
            where = ", ".join(f"{k}={v}" for k, v in zip(by, key, strict=True))
            what = "; ".join(f"{k}: {', '.join(v)}" for k, v in diff.items())
            raise U.MixedSettings(f"table {table}: the cells at {where} differ in more than seed ({what}); "
                                  f"they would be averaged as seeds of one setting. Select one setting "
                                  f"(a results directory of one sweep, or filter the records) first.")


def table(df: pd.DataFrame, name: str, paper_model: str | None = None, stage: str = "final",
          units: dict | None = None, draws: int = U.B) -> Table:
    """Fill table ``name`` (see :func:`list_tables`) from the tidy records ``df``.

    Rows come from our records (each row's model maps to the paper's name, or, when the paper has no
    such model, e.g. at embedded scale, to ``paper_model``, default: the table's reference model).
    With no matching records, the rows are the reference model's, ours empty."""
    sp = spec(name)
    ref = paper_model or sp["paper_model"]
    allcsv = paper_values()
    csv = allcsv[(allcsv["paper"] == sp["paper"]) & (allcsv["table"] == sp["table"])]
    if sp.get("paper_setting"):  # the CSV's own bits labels to keep (LR-QAT Table 5: "4-8-4" and "16-16-16")
        csv = csv[csv["bits"].isin(sp["paper_setting"])]
    if ref not in set(csv["model"]):
        raise KeyError(f"paper_model={ref!r} is not in {sp['paper']} {sp['table']}; choose one of: "
                       f"{', '.join(sorted(set(csv['model'])))}")
    csv = csv[["model", "method", "dataset_or_task", "metric", "bits_n", "group_n", "value_f"]]
    own = [n for n in sp.get("sweeps", []) if n in set(df["sweep"])]
    if own:  # the table's own experiments only: other sweeps (lr studies, ...) never mix into its means
        df = df[df["sweep"].isin(own)]
    df = variants(df, sp["methods"])
    where, keys = sp.get("where", {}), list(sp["rows"])
    conf = {k: v for k, v in where.items() if "." in k}  # config filters (quant.act_bits: 8): cells only
    where = {k: v for k, v in where.items() if k not in conf}
    for k, v in conf.items():
        df = df[df[k] == v] if k in df else df.iloc[:0]
    real = [m for m in sp["methods"] if m not in registry()["sixteen_bit"]]
    expect = sorted({k for want in sp.get("expect", {}).values() for k in want} & set(df.columns))
    units = df.attrs.get("units") or {} if units is None else units  # per-window / per-item data (load)
    ours = df[["model", "method", "bits", "group_size", "seed", "cell_id", "sweep", "metric", "value", "path",
               *expect]]
    scope = df
    for k, v in where.items():
        scope = scope[(scope[k] == v) | scope["method"].isin(registry()["sixteen_bit"])]
    check_seeds(scope, keys, name, sp["methods"], bool(own),  # never average cells that differ in more than seed
                tuple(sp.get("in_metric", ())))
    for k, v in where.items():
        ours = ours[(ours[k] == v) | ours["method"].isin(registry()["sixteen_bit"])]
    base = ours[ours["method"].isin(real)]
    if base.empty:  # only 16-bit methods (e.g. lora) ran: their cells still make the rows
        base = ours[ours["method"].isin(set(sp["methods"]) - {"fp16"})]
    if len(base):
        rows = base[keys].drop_duplicates().sort_values(keys).to_dict("records")
    else:  # the paper's layout for the reference model, ours empty
        p = csv[(csv["model"] == ref) & (csv["bits_n"] != 16)]
        p = p.rename(columns={"bits_n": "bits", "group_n": "group_size"})
        for k, v in where.items():
            p = p[p[k] == v]
        rows = p[keys].drop_duplicates().to_dict("records")
    recs, used, group_swaps, fallbacks = [], set(), set(), set()
    labels = {m: _label(m, csv) for m in sp["methods"]}
    recs_csv = list(csv.itertuples(index=False))
    recs_ours = list(ours.astype(object).where(ours.notna(), None).itertuples(index=False))
    for row in rows:
        row = {**where, **{k: (int(v) if k != "model" else v) for k, v in row.items()}}
        pm = _paper_model(row["model"], csv, ref) if "model" in row else ref
        for col in sp["columns"]:
            sign = M.direction(col["ours"][0]) or 0
            found = {m: _ours(recs_ours, row, m, col, sp, stage, units) for m in sp["methods"]}
            proxy = bool(col.get("proxy")) and not any(f[1] for f in found.values())
            if proxy:  # no record has this column's metric: ours by the proxy (perplexity), for every method
                found = {m: _ours(recs_ours, row, m, {"ours": col["proxy"]}, sp, stage, units)
                         for m in sp["methods"]}
            for m in sp["methods"]:
                o, metric, n, cells = found[m]
                ci = U.summary(cells, draws) if cells else {"ci_low": np.nan, "ci_high": np.nan, "n": 0, "basis": ""}
                k = M.scale(metric) if metric else 1.0
                label = col.get("labels", {}).get(m, labels[m])  # a column may name another paper row
                p, pg = _paper(recs_csv, pm, label, row, col, sp)
                if metric:
                    used.add(metric)
                    want = sp.get("stages", {}).get(m)
                    if want and M.parse(metric).stage != want:
                        fallbacks.add(f"{m}: no `{want}` value for {col['label']}, its `{M.parse(metric).stage}` shown")
                if not pd.isna(pg) and row.get("group_size") not in (None, pg):
                    group_swaps.add((row["group_size"], int(pg)))
                recs.append({**{k: row[k] for k in keys}, "paper_model": pm, "column": col["label"], "method": m,
                             "label": label, "ours": o, "ours_low": ci["ci_low"] * k, "ours_high": ci["ci_high"] * k,
                             "n_seeds": ci["n"], "basis": ci["basis"], "cells": cells,
                             "paper": p, "ours_metric": metric, "n_cells": n, "sign": sign,
                             "sign_ours": (M.direction(metric) or 0) if proxy and metric else sign, "proxy": proxy})
    values = pd.DataFrame(recs)
    order = ordering(values, sp, [*keys, "paper_model"])
    notes = _notes(sp, values, keys, used, group_swaps, stage, ours)
    if own:
        notes.insert(1, f"Records of the sweep(s) {', '.join(own)} only.")
    if sp.get("paper_bits"):
        notes.insert(1, f"The paper gives this table at {sp['paper_bits']} bits only: its values stand beside ours at "
                        "every bit width.")
    return Table(name, sp, values.drop(columns=["sign", "sign_ours", "cells"]), order,
                 notes[:1] + sorted(fallbacks) + notes[1:])


def _notes(sp: dict, values: pd.DataFrame, keys: list[str], used: set, swaps: set, stage: str,
           ours: pd.DataFrame) -> list[str]:
    per = "".join(f", {m}: `{s}`" for m, s in sp.get("stages", {}).items())
    notes = [f"Cells: ours ± CI [paper]. Ours = mean over seeds (cells that differ only in `seed`) of the record "
             f"metric at stage `{stage}` (fp16: `fp`{per}); accuracies ×100. ± = half-width of its 95 % interval "
             "(bootstrap over seeds and eval windows / items; Student's t over seeds where records have no "
             "per-window data); no ±: nothing to resample. –: no value."]
    have = values[values["n_seeds"] > 0]
    if len(have):
        n = sorted(set(have["n_seeds"]))
        bases = have["basis"].value_counts()
        notes.append(f"Seeds per value: n = {n[0] if len(n) == 1 else f'{n[0]}–{n[-1]}'}. Intervals over: "
                     + ", ".join(f"{b} ({c} values)" for b, c in bases.items()) + ".")
    foreign = sorted({(r.model, r.paper_model) for r in values.itertuples() if r.paper_model != r.model
                      and r.paper_model not in (registry()["models"].get(r.model) or [])}) if "model" in keys else []
    if foreign:
        pairs = ", ".join(f"{a} beside {b}" for a, b in foreign)
        notes.append(f"**Different models**: {pairs}. The paper's numbers are for another model (at embedded "
                     "scale for a far larger one): compare the ORDERING of methods (direction), not the values.")
    for ours_g, paper_g in sorted(swaps):
        notes.append(f"Ours at group_size {ours_g} beside the paper's group {paper_g}.")
    if used:
        bases: dict[str, list[str]] = {}
        for u in sorted(used):
            m = M.parse(u)
            bases.setdefault(f"{m.kind}/{m.target}", []).append(m.stage or "")
        notes.append("Our metrics: " + ", ".join(f"`{b}` ({', '.join(s)})" for b, s in bases.items()) + ".")
    stand = sorted({f"{M.parse(u).kind}/{M.parse(u).target}" for u in used if M.is_standin(u)})
    if stand:
        notes.append("Offline stand-ins / samples (" + ", ".join(stand) + ") are NOT the paper's evaluation sets.")
    labels = values.drop_duplicates("method")
    notes.append("Methods: " + ", ".join(f"{r.method} = {r.label or '(not in the paper)'}" for r in labels.itertuples())
                 + ".")
    for method, want in sp.get("expect", {}).items():
        cells = ours[ours["method"] == method].drop_duplicates("cell_id")
        for key, val in want.items():
            got = sorted({str(v) for v in cells[key]}) if key in cells else []  # a missing key: 'nan'
            if got and got != [str(val)]:
                notes.append(f"{method} ran with {key}={','.join(got)}; the paper's setting is {key}={val}.")
    if values["proxy"].any():
        cols = list(dict.fromkeys(values.loc[values["proxy"], "column"]))
        tried = dict.fromkeys(m for c in sp["columns"] if c["label"] in cols for m in c["proxy"])
        notes.append(f"**Proxy**: no record has the paper's metric for {', '.join(cols)}; those cells show our "
                     f"perplexity (`ppl` …, lower is better; metrics tried: {', '.join(tried)}) beside the paper's "
                     "accuracy, and direction compares the paper's ordering by its metric with ours by perplexity. "
                     "Run the experiment with an accuracy eval (eval=embedded) for the paper's metric itself.")
    notes.append("direction: for every pair of methods with both values, the difference (the paper's better method "
                 "minus its worse one, in ours) with its 95 % interval: **holds** when the interval excludes 0 in the "
                 "paper's direction, **flips** when it excludes 0 the other way, **unresolved** otherwise (always "
                 "with one seed and no per-window / per-item data). `Table.ordering` lists each pair.")
    if sp.get("note"):
        notes.append(sp["note"])
    return notes
