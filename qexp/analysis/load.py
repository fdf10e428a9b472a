"""Records → one tidy DataFrame: one row per cell × metric, config flattened into columns.

Sources: a directory (every ``result.json`` below it), a W&B runs export (``.csv`` from the runs
table, or ``.json``/``.jsonl`` with one run per item: ``config``, ``summary``, ``state``), a
``qexp.plan`` JSON (its predicted memory per cell: :func:`from_plan`; a directory's ``plan/*.json``
are read too), or
``wandb:<entity>/<project>`` (the W&B API; needs a login). Records that are not ``ok`` (failed,
preempted, running, corrupt) go to :attr:`Results.failed` and never into the metrics; preempted
ones (a stop signal: the sweep's command resumes them) are also :attr:`Results.preempted`. ``ok``
records whose final model is degenerate stay in, and their warnings are :attr:`Results.warnings`.
The per-window NLL and per-item scores of the ok records (:mod:`.uncertainty`) ride along in
``df.attrs["units"]`` (record path → metric → arrays), so tables can bootstrap them, and the training
losses per step in ``df.attrs["losses"]`` (record path → list), for the loss curves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from . import metrics as M
from .uncertainty import Units, record_units, sample_units

CELL = ["sweep", "model", "method", "bits", "group_size", "seed", "dataset", "cell_id"]
TIDY = [*CELL, "metric", "kind", "target", "stage", "value"]
FAILED = ["status", "error", "sweep", "model", "method", "bits", "group_size", "seed", "path", "resume"]
WARNINGS = ["sweep", "model", "method", "bits", "group_size", "seed", "cell_id", "warning", "path"]
# Config keys that are not columns: not part of the result, or already a CELL column.
SKIP = ("tracking", "results_dir", "cache_dir", "force", "name", "bits", "group_size", "seed", "model.name",
        "method.name", "data.name", "model.random", "data.train", "data.eval", "data.calib", "_wandb")
WANDB_STATES = {"finished": "ok", "failed": "failed", "crashed": "failed", "killed": "failed", "running": "running"}


@dataclass
class Results:
    """``df``: ok cells, one row per cell × metric. ``failed``: the records left out, and why.
    ``warnings``: ok cells whose final model is degenerate (collapsed), one row per warning."""

    df: pd.DataFrame
    failed: pd.DataFrame
    warnings: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=WARNINGS))

    @property
    def preempted(self) -> pd.DataFrame:
        """The cells a stop signal interrupted (``resume``: the step and checkpoint a rerun starts from)."""
        return self.failed[self.failed["status"] == "preempted"]

    def cells(self, stage: str | None = "final") -> pd.DataFrame:
        """Wide view: one row per cell, one column per metric of ``stage`` (plus time/mem/size)."""
        return wide(self.df, stage)

    def __repr__(self) -> str:
        n = self.df["cell_id"].nunique() if len(self.df) else 0
        counts = self.failed["status"].value_counts()
        why = (": " + ", ".join(f"{v} {k}" for k, v in counts.items())) if len(counts) else ""
        warn = f", {self.warnings['cell_id'].nunique()} with warnings" if len(self.warnings) else ""
        return f"Results({n} ok cells, {len(self.df)} metric rows, {len(self.failed)} not ok{why}{warn})"


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts → dotted keys; lists → comma-joined strings."""
    if not isinstance(d, dict):
        return {prefix: ",".join(map(str, d)) if isinstance(d, list) else d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in flat.items():
        *head, last = k.split(".")
        node = out
        for h in head:
            node = node.setdefault(h, {}) if isinstance(node.get(h, {}), dict) else {}
        node[last] = v
    return out


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, int | float):
        return float(v)
    return None


def record_metrics(rec: dict) -> dict[str, float]:
    """The record's metrics plus its timings, memory, merge report, losses and size as metrics."""
    out = {k: v for k, v in (rec.get("metrics") or {}).items() if _num(v) is not None}
    sections = {"time": rec.get("timings"), "mem": rec.get("memory"), "merge": rec.get("merge"),
                "train": {k: v for k, v in (rec.get("train") or {}).items() if k.startswith("loss_")},
                "size": rec.get("size"), "export": rec.get("export"), "init": rec.get("init")}
    for kind, sec in sections.items():
        for k, v in flatten(sec or {}).items():
            if _num(v) is not None:
                out[f"{kind}/{k.removesuffix('_s') if kind == 'time' else k}"] = v
    steps, train_s = (rec.get("train") or {}).get("steps"), (rec.get("timings") or {}).get("train_s")
    t = (rec.get("config") or {}).get("train") or {}
    if _num(steps) and _num(train_s) is not None:  # QWHA Table 5: training time per step, by batch
        out["time/train_step"] = train_s / steps
        out[f"time/train_step_b{t.get('batch_size', 1) * t.get('grad_accum', 1)}"] = train_s / steps
    return {M.parse(k).name: float(_num(v)) for k, v in out.items()}


def cell_info(rec: dict, path: str) -> dict[str, Any]:
    cfg = rec.get("config") or {}

    def name(key: str) -> Any:
        v = cfg.get(key)
        return v.get("name") if isinstance(v, dict) else v

    return {"sweep": rec.get("name") or cfg.get("name"), "model": name("model"), "method": name("method"),
            "bits": cfg.get("bits"), "group_size": cfg.get("group_size"), "seed": cfg.get("seed"),
            "dataset": name("data"), "cell_id": rec.get("cell_id") or path, "path": path}


def config_columns(cfg: dict) -> dict[str, Any]:
    return {k: v for k, v in flatten(cfg).items() if not any(k == s or k.startswith(f"{s}.") for s in SKIP)}


def read_json(path: Path) -> dict:
    """A record, or ``{"status": "corrupt", "error": ...}`` if it cannot be read as one."""
    try:
        rec = json.loads(Path(path).read_text())
        if not isinstance(rec, dict) or "status" not in rec:
            raise ValueError("not a qexp record (no 'status')")
        if rec["status"] == "ok" and not isinstance(rec.get("config"), dict):
            raise ValueError("ok record without a config")
        return rec
    except (OSError, ValueError) as e:
        return {"status": "corrupt", "error": f"{type(e).__name__}: {e}"}


def from_records(recs: list[tuple[str, dict]]) -> Results:
    """(path, record) pairs → :class:`Results`."""
    rows, failed, warnings, units, losses = [], [], [], Units(), Units()
    for path, rec in recs:
        info = cell_info(rec, path)
        if rec.get("status") != "ok":
            stop = rec.get("preempted") or {}
            resume = f"step {stop.get('step')} ({stop.get('checkpoint') or 'no checkpoint'})" if stop else None
            failed.append({**{k: info.get(k) for k in FAILED}, "status": rec.get("status"),
                           "error": rec.get("error"), "resume": resume})
            continue
        warnings += [{**{k: info.get(k) for k in WARNINGS}, "warning": w} for w in rec.get("warnings") or []]
        cfg = config_columns(rec["config"])
        u = record_units(rec)
        if Path(path).name == "result.json":  # a directory's record: lm-eval samples beside it, if any
            u = sample_units(Path(path).parent, rec) | u
        # by record, not cell_id: one cell id can be in several records (a cell copied into another
        # sweep, or rerun), and each row's interval must come from its own record's windows
        if u:
            units[path] = u
        if (rec.get("train") or {}).get("losses"):
            losses[path] = rec["train"]["losses"]
        for name, value in record_metrics(rec).items():
            m = M.parse(name)
            rows.append({**info, "metric": m.name, "kind": m.kind, "target": m.target, "stage": m.stage,
                         "value": value, **cfg})
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=[*TIDY, "path"])
    for c in ("bits", "group_size", "seed"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64")
    df = df[[*TIDY, *sorted(c for c in df.columns if c not in TIDY and c != "path"), "path"]]
    bad = pd.DataFrame(failed, columns=FAILED)
    for c in ("bits", "group_size", "seed"):
        bad[c] = pd.to_numeric(bad[c], errors="coerce").astype("Int64")
    df = df.reset_index(drop=True)
    df.attrs["units"], df.attrs["losses"] = units, losses
    return Results(df, bad, pd.DataFrame(warnings, columns=WARNINGS))


def from_plan(doc: dict, path: str) -> list[tuple[str, dict]]:
    """A ``qexp.plan`` JSON: one record per planned cell, its predicted peak (and train-step peak) device
    memory in GiB (``mem/plan_peak_gib``, ``mem/plan_train_gib``); the sweep is its ``+experiment``, and
    dotted overrides (``method.rank=8``) enter the config, so table variants find the cell."""
    import yaml

    out = []
    for i, c in enumerate(doc["cells"]):
        sets = dict(o.split("=", 1) for o in c.get("overrides", []) if "=" in o)
        sweep = sets.get("+experiment") or doc.get("name") or "plan"
        config: dict = {"name": sweep, "model": {"name": c["model"]}, "method": {"name": c["method"]},
                        "bits": c["bits"], "group_size": c["group_size"]}
        extra = unflatten({k: yaml.safe_load(v) for k, v in sets.items() if "." in k and not k.startswith(("+", "~"))})
        for k, v in extra.items():
            config[k] = {**config[k], **v} if isinstance(v, dict) and isinstance(config.get(k), dict) else v
        stages = c.get("stages_mb", {})
        mem = {"plan_peak_gib": c["peak_mb"] / 1024, **({"plan_train_gib": stages["train"] / 1024} if "train" in stages
                                                         else {})}
        out.append((f"{path}#{i}", {"status": "ok", "name": sweep, "cell_id": f"plan:{c['cell']}", "config": config,
                                    "metrics": {}, "memory": mem}))
    return out


def is_plan(doc: Any) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("cells"), list) and all("peak_mb" in c for c in doc["cells"])


def wandb_record(config: dict, summary: dict, state: str | None, name: str | None = None) -> dict:
    """One W&B run (config, summary, state) as a qexp record."""
    status = WANDB_STATES.get(str(state).lower(), str(state).lower()) if state else "ok"
    return {"status": status, "name": config.get("name"), "cell_id": name, "config": config,
            "metrics": {k: v for k, v in summary.items() if M.is_metric(k) and _num(v) is not None},
            "error": None if status == "ok" else f"W&B run state: {state}"}


def from_wandb_csv(path: Path) -> list[tuple[str, dict]]:
    """The W&B runs-table CSV export: config as ``a.b`` columns, summary metrics as their names."""
    df = pd.read_csv(path)
    low = {c.lower(): c for c in df.columns}
    out = []
    for i, row in df.iterrows():
        vals = {c: (None if pd.isna(v) else v) for c, v in row.items()}
        metrics = {c: v for c, v in vals.items() if M.is_metric(c)}
        config = unflatten({c: v for c, v in vals.items() if c not in metrics and c.lower() not in ("state", "name")})
        run = vals.get(low["name"]) if "name" in low else f"row{i}"
        out.append((f"{path}#{run}", wandb_record(config, metrics, vals.get(low.get("state", "")), run)))
    return out


def from_wandb_api(project: str) -> list[tuple[str, dict]]:
    """Runs of ``<entity>/<project>`` through the W&B API (online)."""
    import wandb

    runs = wandb.Api().runs(project)
    return [(f"wandb:{project}/{r.id}", wandb_record(dict(r.config), dict(r.summary), r.state, r.id)) for r in runs]


def load(source: str | Path | list) -> Results:
    """Every record under ``source`` (see the module docstring for the accepted sources); a list of
    directories: every record under each (e.g. two sweeps that hold different seeds)."""
    if isinstance(source, list | tuple):
        if not all(Path(d).is_dir() for d in source):
            raise FileNotFoundError(f"several results sources must all be directories: {list(map(str, source))}")
        return from_records([(str(f), read_json(f)) for d in source for f in sorted(Path(d).rglob("result.json"))])
    s = str(source)
    if s.startswith("wandb:"):
        return from_records(from_wandb_api(s.removeprefix("wandb:")))
    p = Path(source)
    if p.is_dir():
        plans = [(f, json.loads(f.read_text())) for f in sorted(p.rglob("plan/*.json"))]
        return from_records([(str(f), read_json(f)) for f in sorted(p.rglob("result.json"))]
                            + [r for f, d in plans if is_plan(d) for r in from_plan(d, str(f))])
    if p.suffix == ".csv":
        return from_records(from_wandb_csv(p))
    if p.suffix in (".json", ".jsonl") and p.exists():
        text = p.read_text()
        runs = json.loads(text) if p.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
        if is_plan(runs):
            return from_records(from_plan(runs, str(p)))
        runs = runs if isinstance(runs, list) else [runs]
        return from_records([(f"{p}#{i}", r if "status" in r else
                              wandb_record(r.get("config", {}), r.get("summary", {}), r.get("state"), r.get("name")))
                             for i, r in enumerate(runs)])
    raise FileNotFoundError(f"results source {s!r}: not a directory of result.json files, a W&B export "
                            f"(.csv/.json/.jsonl) or wandb:<entity>/<project>")


def wide(df: pd.DataFrame, stage: str | None = "final") -> pd.DataFrame:
    """One row per cell; columns: the metrics of ``stage`` (and the stage-less ones: time, mem, ...)."""
    sel = df[(df["stage"] == stage) | df["stage"].isna()] if stage else df
    keys = [c for c in CELL if c != "cell_id"] + ["cell_id"]
    out = sel.groupby([*keys, "metric"], dropna=False)["value"].mean().unstack("metric")
    return out.dropna(axis=1, how="all").reset_index().rename_axis(columns=None)
