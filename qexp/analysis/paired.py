"""Paired exact-match differences between the cells of a sweep, item by item, with their uncertainty.

``python -m qexp.analysis.paired results/<sweep> [--task qexp_asdiv] [--stage final] [--baseline gptq]``

Every item's score comes from the record (``eval.lm_eval.<stage>.items.<task>``, records since
issue 21) or from ``samples_<stage>/<task>.jsonl`` (cells run with ``eval.log_samples=true``). Two
cells scored on the same items differ by the mean of the per-item differences
d = correct_a - correct_b; its 95 % interval is mean(d) ± 1.96 sd(d) / √n (normal approximation of
the paired difference), and ``a_only`` / ``b_only`` count the discordant items (McNemar's counts).
A difference whose interval contains 0 is ``unresolved``. Each seed is paired with the baseline's cell of
the same seed; with several seeds, a pooled row per method averages each item's difference over the seeds
first, so the interval stays over items (the unit that was sampled), not over item × seed.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd


def item_scores(sweep: str | Path, task: str, stage: str = "final") -> pd.DataFrame:
    """One column per cell (``<method>-w<bits>-s<seed>``), one row per doc_id: the item's exact match (0/1)."""
    cols = {}
    for r in sorted(Path(sweep).rglob("result.json")):
        rec = json.loads(r.read_text())
        # a cell copied from another sweep (reused_from) keeps its samples there
        f = next((d / f"samples_{stage}" / f"{task}.jsonl" for d in (r.parent, Path(rec.get("reused_from") or r.parent))
                  if (d / f"samples_{stage}" / f"{task}.jsonl").exists()), None)
        c = rec["config"]
        if f is not None:
            rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            scores = {r["doc_id"]: float(r["exact_match"]) for r in rows}
        else:  # records since issue 21 keep every item's score themselves
            items = (((rec.get("eval") or {}).get("lm_eval") or {}).get(stage) or {}).get("items", {}).get(task)
            if not items or "exact_match" not in items:
                continue
            em = items["exact_match"]
            values = [int(ch) for ch in em] if isinstance(em, str) else em
            scores = dict(zip(items.get("doc_ids", range(len(values))), map(float, values), strict=True))
        cols[f"{c['method']['name']}-w{c['bits']}-s{c.get('seed', 0)}"] = pd.Series(scores)
    if not cols:
        raise FileNotFoundError(f"no per-item exact match for {task} at stage {stage} under {sweep}: neither in the "
                                f"records (eval.lm_eval.{stage}.items) nor in samples_{stage}/{task}.jsonl")
    return pd.DataFrame(cols).sort_index()


def difference(d: pd.Series) -> dict:
    """Per-item differences ``d`` → their mean, its 95 % interval (normal approximation) and verdict."""
    n = len(d)
    half = 1.96 * d.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
    diff = d.mean()
    return {"items": n, "diff": diff, "ci_low": diff - half, "ci_high": diff + half,
            "verdict": "unresolved" if (diff - half) <= 0 <= (diff + half) else "higher" if diff > 0 else "lower"}


def paired(scores: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Each cell against ``baseline`` on the items both scored: exact match, difference, 95 % interval."""
    out = []
    for cell in scores.columns:
        keep = scores[cell].notna() & scores[baseline].notna()
        a, b = scores.loc[keep, cell], scores.loc[keep, baseline]
        d = a - b
        out.append({"cell": cell, "exact_match": a.mean(), "vs": baseline, **difference(d),
                    "a_only": int((d > 0).sum()), "b_only": int((d < 0).sum())}
                   | ({"verdict": "—"} if cell == baseline else {}))
    return pd.DataFrame(out)


def pooled(scores: pd.DataFrame, baseline: str, bits: str) -> pd.DataFrame:
    """Each method at ``bits`` against the ``baseline`` method over the seeds both have: per item, the mean
    over those seeds of the paired difference; its mean over items and the 95 % interval over items."""
    def seeds(method: str) -> dict[str, str]:
        return {c.rsplit("-s", 1)[1]: c for c in scores.columns if c.rsplit("-s", 1)[0] == f"{method}-w{bits}"}
    base = seeds(baseline)
    out = []
    for method in sorted({c.rsplit("-w", 1)[0] for c in scores.columns if f"-w{bits}-s" in c} - {baseline}):
        mine = seeds(method)
        common = sorted(set(mine) & set(base))
        if not common:
            continue
        d = pd.concat([scores[mine[s]] - scores[base[s]] for s in common], axis=1).dropna().mean(axis=1)
        em = pd.concat([scores[mine[s]] for s in common], axis=1).loc[d.index].mean().mean()
        out.append({"cell": f"{method}-w{bits}", "seeds": len(common), "exact_match": em,
                    "vs": f"{baseline}-w{bits}", **difference(d)})
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m qexp.analysis.paired", description=__doc__.splitlines()[0])
    p.add_argument("sweep")
    p.add_argument("--task", default="qexp_asdiv")
    p.add_argument("--stage", default="final")
    p.add_argument("--baseline", default="gptq", help="method name; the baseline's cell at each bit width")
    a = p.parse_args(argv)
    scores = item_scores(a.sweep, a.task, a.stage)
    for bits in sorted({c.rsplit("-w", 1)[1].rsplit("-s", 1)[0] for c in scores.columns}):
        at = [c for c in scores.columns if f"-w{bits}-s" in c]
        seeds = sorted({c.rsplit("-s", 1)[1] for c in at}, key=int)
        for seed in seeds:
            cells = [c for c in at if c.endswith(f"-s{seed}")]
            base = f"{a.baseline}-w{bits}-s{seed}"
            if base not in cells:
                print(f"w{bits} seed {seed}: no {base} cell")
                continue
            t = paired(scores[cells], base)
            print(f"\n{a.task} ({a.stage}), {bits} bits, seed {seed}, against {base}; exact match and differences "
                  "in %:\n")
            print("| cell | items | exact match | diff [95 % CI] | only this / only base right | verdict |")
            print("|---|---|---|---|---|---|")
            for r in t.itertuples():
                print(f"| {r.cell} | {r.items} | {100 * r.exact_match:.1f} | {100 * r.diff:+.1f} "
                      f"[{100 * r.ci_low:+.1f}, {100 * r.ci_high:+.1f}] | {r.a_only} / {r.b_only} | {r.verdict} |")
        if len(seeds) > 1:
            t = pooled(scores, a.baseline, bits)
            print(f"\n{a.task} ({a.stage}), {bits} bits, over seeds {', '.join(seeds)} (each item's difference "
                  f"averaged over the seeds, interval over items), against {a.baseline}-w{bits}; in %:\n")
            print("| cell | seeds | items | exact match (mean) | diff [95 % CI] | verdict |")
            print("|---|---|---|---|---|---|")
            for r in t.itertuples():
                print(f"| {r.cell} | {r.seeds} | {r.items} | {100 * r.exact_match:.1f} | {100 * r.diff:+.1f} "
                      f"[{100 * r.ci_low:+.1f}, {100 * r.ci_high:+.1f}] | {r.verdict} |")


if __name__ == "__main__":
    main()
