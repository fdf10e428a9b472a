"""Uncertainty in the analysis: seeds and eval windows / items → mean ± CI, holds / flips / unresolved."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from qexp import analysis
from qexp.analysis import uncertainty as U
from qexp.analysis.__main__ import main
from qexp.analysis.load import from_records

ROW = ("smollm2_135m", 3, 64, "LLaMA-2-7B")  # lrqat_t4 at 3 bits g64, beside the paper's LLaMA-2-7B
PPL = "ppl/wikitext_sample/final"


def record(method: str, seed: int, nll: list[float] | None, value: float | None = None, lr: float = 1e-4,
           sweep: str = "lrqat_t4_embedded") -> tuple[str, dict]:
    """An ok record with per-window NLL (``nll``) or, like a record before issue 21, only its value."""
    cfg = {"model": {"name": "smollm2_135m"}, "data": {"name": "embedded"}, "bits": 3, "group_size": 64,
           "seed": seed, "method": {"name": method}, "train": {"lr": lr}}
    ppl = math.exp(float(np.mean(nll))) if nll is not None else value
    ev = {"wikitext_sample": {"seqlen": 512, "windows": len(nll), "window_nll": {"final": nll}}} if nll else {}
    cid = f"{method}-s{seed}-lr{lr}"
    return f"{sweep}/{cid}/result.json", {"status": "ok", "name": sweep, "cell_id": cid, "config": cfg,
                                          "metrics": {PPL: ppl}, "eval": ev}


def windows(level: float, seed: int, n: int = 8, spread: float = 0.3) -> list[float]:
    """Per-window NLL: the text's windows differ a lot (shared by every cell), the model shifts them."""
    text = np.random.default_rng(123).normal(0, spread, n)  # the same windows for every cell
    noise = np.random.default_rng(seed).normal(0, 0.01, n)
    return [round(float(x), 4) for x in level + text + noise]


def pair(t: analysis.Table, better: str, worse: str) -> dict:
    o = t.ordering[(t.ordering["column"] == "Wiki2 ppl") & (t.ordering["better"] == better)
                   & (t.ordering["worse"] == worse)]
    assert len(o) == 1
    return o.iloc[0].to_dict()


def test_orderings_hold_flip_or_stay_unresolved_by_their_interval():
    # the paper at 3 bits: LR-QAT (5.98) < GPTQ (6.29) < RTN (7.61)
    recs = [record("lrqat", s, windows(3.0, s)) for s in range(3)]
    recs += [record("rtn", s, windows(3.5, 10 + s)) for s in range(3)]  # clearly worse than lrqat: holds
    recs += [record("gptq", s, windows(3.0, 20 + s)) for s in range(3)]  # same as lrqat: unresolved
    t = analysis.table(from_records(recs).df, "lrqat_t4")
    assert pair(t, "lrqat", "rtn")["verdict"] == "holds" and pair(t, "lrqat", "rtn")["ci_low"] > 0
    assert pair(t, "lrqat", "gptq")["verdict"] == "unresolved"
    assert pair(t, "gptq", "rtn")["basis"] == "seeds×windows"
    flipped = [record("lrqat", s, windows(3.5, s)) for s in range(3)] + [record("rtn", s, windows(3.0, 10 + s))
                                                                         for s in range(3)]
    f = analysis.table(from_records(flipped).df, "lrqat_t4")
    assert pair(f, "lrqat", "rtn")["verdict"] == "flips" and pair(f, "lrqat", "rtn")["ci_high"] < 0
    assert f.direction()[ROW].startswith("0 hold, 1 flip, 0 unresolved of 1; flips: lrqat vs rtn (Wiki2 ppl)")
    # the table shows mean ± CI, and the mean is over the seeds
    row = t.values[(t.values["column"] == "Wiki2 ppl") & (t.values["method"] == "rtn")].iloc[0]
    assert row["n_seeds"] == 3 and row["ours"] == pytest.approx(np.mean([r[1]["metrics"][PPL] for r in recs[3:6]]))
    assert row["ours_low"] < row["ours"] < row["ours_high"]
    assert f"{row['ours']:.2f} ± {(row['ours_high'] - row['ours_low']) / 2:.2f} [" in t.markdown()
    assert "Seeds per value: n = 3. Intervals over: seeds×windows" in t.markdown()


def test_one_seed_without_per_window_data_is_unresolved_never_holds(monkeypatch):
    recs = [record("lrqat", 0, None, value=10.0), record("rtn", 0, None, value=1e5)]  # a huge gap, old records
    t = analysis.table(from_records(recs).df, "lrqat_t4")
    o = pair(t, "lrqat", "rtn")
    assert o["verdict"] == "unresolved" and o["agrees"]
    assert o["basis"] == "none: 1 seed and no per-window data; fewer than 2 seeds" and math.isnan(o["ci_low"])
    assert "10.00 [" in t.markdown() and "10.00 ±" not in t.markdown()  # an old record still prints, no ±
    # with per-window data one seed can resolve it (over the windows only), and says so
    one = from_records([record("lrqat", 0, windows(3.0, 0)), record("rtn", 0, windows(3.5, 1))]).df
    assert pair(analysis.table(one, "lrqat_t4"), "lrqat", "rtn")["verdict"] == "unresolved"  # default: 2 seeds
    monkeypatch.setattr(U, "MIN_SEEDS", 1)
    one = analysis.table(one, "lrqat_t4")
    assert pair(one, "lrqat", "rtn")["verdict"] == "holds" and pair(one, "lrqat", "rtn")["basis"] == "windows (1 seed)"
    monkeypatch.setattr(U, "MIN_SEEDS", 2)
    # several seeds without windows: Student's t over the seeds
    few = [record("lrqat", s, None, value=v) for s, v in enumerate([10.0, 30.0])]
    few += [record("rtn", s, None, value=v) for s, v in enumerate([12.0, 31.0])]
    o = pair(analysis.table(from_records(few).df, "lrqat_t4"), "lrqat", "rtn")
    assert o["basis"].startswith("seeds (t") and o["verdict"] == "unresolved"  # 2 and 1 better: t(1) is wide


def test_a_cell_copied_into_another_sweep_keeps_its_own_records_windows():
    """One cell id in two records (a cell copied into another sweep, or rerun there): each value's
    interval comes from its own record. Keyed by cell id, the other record's windows (another run) gave
    this one an interval it has no data for."""
    old = record("lrqat", 0, None, value=10.0)  # this table's record: from before per-window NLL
    copy_ = record("lrqat", 0, windows(3.0, 0), sweep="budget_embedded")  # same cell id, another sweep
    t = analysis.table(from_records([old, record("rtn", 0, None, value=20.0), copy_]).df, "lrqat_t4")
    assert "10.00 [" in t.markdown() and "10.00 ±" not in t.markdown()
    assert pair(t, "lrqat", "rtn")["basis"].startswith("none: 1 seed and no per-window data")
    s = analysis.seed_summary(from_records([copy_, old]).df, PPL)  # the first record of the cell, its windows
    assert s.iloc[0]["basis"] == "windows (1 seed)" and s.iloc[0]["mean"] == pytest.approx(copy_[1]["metrics"][PPL])


def test_the_window_bootstrap_is_paired(monkeypatch):
    """A small, consistent gain on every window resolves although the windows differ far more than that:
    both cells are resampled on the same windows. Resampled independently, it would not resolve."""
    monkeypatch.setattr(U, "MIN_SEEDS", 1)  # one seed, judged over its windows (--min-seeds 1)
    a = U.Cells(PPL, [0], [0.0], [[np.asarray(windows(3.0, 0, n=16, spread=1.0))]])
    b = U.Cells(PPL, [0], [0.0], [[a.units[0][0] + 0.02]])
    a.values, b.values = [float(U.statistic(PPL, a.units[0]))], [float(U.statistic(PPL, b.units[0]))]
    c = U.compare(a, b, sign=-1)
    assert c["verdict"] == "holds" and c["ci_low"] > 0
    lo, hi = U.interval(U.bootstrap([b], seed=1)[0] - U.bootstrap([a], seed=2)[0])  # independent draws
    assert lo < 0 < hi  # the windows' spread swamps the gain


def test_seed_summary_mean_std_n_and_interval():
    recs = [record("lrqat", s, windows(3.0 + 0.05 * s, s)) for s in range(3)]
    recs += [record("lrqat", 0, windows(3.2, 0), lr=1e-3)]  # another setting: its own row, not averaged in
    s = analysis.seed_summary(from_records(recs).df, PPL)
    assert list(s["train.lr"]) == [1e-4, 1e-3] or list(s["train.lr"]) == [1e-3, 1e-4]
    row = s[s["train.lr"] == 1e-4].iloc[0]
    values = [r[1]["metrics"][PPL] for r in recs[:3]]
    assert row["n"] == 3 and row["seeds"] == [0, 1, 2]
    assert row["mean"] == pytest.approx(np.mean(values)) and row["std"] == pytest.approx(np.std(values, ddof=1))
    assert row["ci_low"] < row["mean"] < row["ci_high"] and row["basis"] == "seeds×windows"
    with pytest.raises(KeyError, match="available: ppl/wikitext_sample/final"):
        analysis.seed_summary(from_records(recs).df, "ppl/nope/final")


def test_cells_that_differ_in_more_than_seed_are_named_not_averaged(tmp_path, capsys):
    recs = [record("lrqat", 0, windows(3.0, 0)), record("lrqat", 1, windows(3.0, 1), lr=1e-3),
            record("rtn", 0, windows(3.5, 2))]
    with pytest.raises(analysis.MixedSettings, match=r"method=lrqat.*train\.lr: 0\.0001, 0\.001"):
        analysis.table(from_records(recs).df, "lrqat_t4")
    for path, rec in recs:  # the CLI says so and stops
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(__import__("json").dumps(rec))
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--table", "lrqat_t4", "--no-plots"])
    assert "differ in more than seed (train.lr: 0.0001, 0.001)" in capsys.readouterr().err


def test_record_units_rebuild_the_recorded_metrics():
    rec = {"eval": {"xsum": {"window_nll": {"base": [3.0, 3.5], "final": [2.0, 2.2, 2.4]}},
                    "lm_eval": {"final": {"items": {"a": {"acc": "0110", "acc_norm": "1111"}, "b": {"acc": "10"}},
                                          "suites": {"s": {"tasks": ["a", "b", "b"], "acc": ["acc"] * 3,
                                                           "acc_norm": ["acc_norm", "acc", "acc"]}}}}}}
    u = U.record_units(rec)
    assert U.statistic("ppl/xsum/final", u["ppl/xsum/final"]) == pytest.approx(math.exp(2.2))
    assert U.statistic("acc/a/final", u["acc/a/final"]) == 0.5
    assert U.statistic("acc/s/final", u["acc/s/final"]) == pytest.approx((0.5 + 0.5 + 0.5) / 3)
    assert U.statistic("acc_norm/s/final", u["acc_norm/s/final"]) == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert U.record_units({"eval": {"xsum": {"seqlen": 512, "windows": 8}}}) == {}  # before issue 21: none


def test_plots_log_axes_seed_error_bars_grid_bits_and_budget():
    from qexp.analysis.plots import grid_bits

    assert grid_bits(3, 64) == 3 + (16 + 3) / 64 and grid_bits(3, 64, float_zero=True) == 3 + 32 / 64
    assert grid_bits(2, -1) == 2
    recs = []
    for steps in (30, 100):
        for s in range(2):
            path, r = record("lrqat", s, windows(3.0 - 0.1 * (steps == 100), s))
            r["config"]["train"]["steps"] = steps
            r["cell_id"] += f"-{steps}"
            r["train"] = {"losses": list(np.linspace(5, 3, steps))}
            recs.append((path + str(steps), r))
    recs.append(record("rtn", 0, windows(9.0, 5)))  # ppl ~ 8e3: the axis must be logarithmic
    df = from_records(recs).df
    fig = analysis.plot_vs_steps(df)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    bars = [c for c in ax.containers if hasattr(c, "has_yerr") and c.has_yerr]
    assert len(bars) == 1  # lrqat: the mean of 2 seeds at 30 and 100 steps, with its interval; rtn: a line
    lines = bars[0].lines[0].get_ydata()
    want = [np.mean([r["metrics"][PPL] for _, r in recs[i:i + 2]]) for i in (0, 2)]
    assert list(lines) == pytest.approx(want)
    assert analysis.plot_vs_bits(df).axes[0].get_yscale() == "log"
    per_bits = [record("lrqat", s, windows(level, s)) for s, level in ((0, 3.0), (1, 3.1), (0, 2.0))]
    for (_, r), bits in zip(per_bits, (2, 2, 4), strict=True):
        r["config"]["bits"] = bits
        r["cell_id"] += f"-w{bits}"
    df3 = from_records([(p + str(i), r) for i, (p, r) in enumerate(per_bits)]).df
    bits_legend = [t.get_text() for t in analysis.plot_vs_bits(df3).axes[0].get_legend().get_texts()]
    assert bits_legend == ["lrqat (n=1–2)"]  # two seeds at 2 bits, one at 4: the legend says both
    assert "bits per quantized weight" in analysis.plot_pareto(df).axes[0].get_xlabel()
    losses = analysis.plot_losses(df).axes[0]
    assert any("100 steps, n=2" in t.get_text() for t in losses.get_legend().get_texts())


def test_pairwise_over_two_sweeps_from_the_cli(tmp_path, capsys):
    """Seeds kept in two sweeps (two directories) are one setting; every pair of methods gets its verdict."""
    import json

    for sweep, seeds in (("a", (0, 1)), ("b", (2,))):
        for s in seeds:
            for method, level in (("lrqat", 3.0), ("rtn", 3.5)):
                _, rec = record(method, s, windows(level, s + (10 if method == "rtn" else 0)), sweep=sweep)
                (tmp_path / sweep / rec["cell_id"]).mkdir(parents=True)
                (tmp_path / sweep / rec["cell_id"] / "result.json").write_text(json.dumps(rec))
    df = analysis.load([tmp_path / "a", tmp_path / "b"]).df
    pw = analysis.pairwise(df, PPL)
    assert len(pw) == 1 and pw.iloc[0]["better"] == "lrqat" and pw.iloc[0]["verdict"] == "holds"
    assert pw.iloc[0]["n_better"] == 3 and pw.iloc[0]["basis"] == "seeds×windows"
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--seeds", "ppl/wikitext_sample", "--no-plots",
                 "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| smollm2_135m | 3 | 64 | embedded | lrqat | rtn |" in out and "| 3, 3 | holds | seeds×windows |" in out


def test_pairwise_along_a_study_axis(tmp_path, capsys):
    """An ablation varies a key within one method (LR-QAT Table 2: ``method.phi``): ``along`` pairs its values,
    which pairing by method never does; a key that is not a setting is refused with the valid ones."""
    import json

    recs = []
    for phi, level in (("int8", 3.0), ("fp32", 3.6)):
        for s in range(3):
            path, r = record("lrqat", s, windows(level, s + (10 if phi == "fp32" else 0)))
            r["config"]["method"]["phi"], r["cell_id"] = phi, r["cell_id"] + phi
            recs.append((path.replace("lrqat-", f"lrqat-{phi}-"), r))
    df = from_records(recs).df
    assert analysis.pairwise(df, PPL).empty  # one method: no pair of methods
    pw = analysis.pairwise(df, PPL, along="method.phi")
    assert len(pw) == 1 and (pw.iloc[0]["better"], pw.iloc[0]["worse"]) == ("int8", "fp32")
    assert pw.iloc[0]["verdict"] == "holds" and pw.iloc[0]["n_better"] == 3 == pw.iloc[0]["n_worse"]
    with pytest.raises(KeyError, match="along='method.rank'.*method.phi"):
        analysis.pairwise(df, PPL, along="method.rank")
    for _, r in recs:
        (tmp_path / r["cell_id"]).mkdir()
        (tmp_path / r["cell_id"] / "result.json").write_text(json.dumps(r))
    assert main([str(tmp_path), "--seeds", "ppl/wikitext_sample", "--along", "method.phi", "--no-plots",
                 "--out", str(tmp_path / "out")]) == 0
    assert "| int8 | fp32 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--seeds", "ppl/wikitext_sample", "--along", "method.rank", "--no-plots",
              "--out", str(tmp_path / "out")])
    assert "method.rank" in capsys.readouterr().err


def test_stability_finds_where_the_ordering_moves(monkeypatch):
    monkeypatch.setattr(U, "MIN_SEEDS", 1)  # one seed per budget, judged over its windows (--min-seeds 1)
    recs = []
    for steps, levels in ((30, {"lrqat": 3.0, "peqa": 3.2}), (100, {"lrqat": 2.9, "peqa": 2.5}),
                          (300, {"lrqat": 2.8, "peqa": 2.4})):
        for method, level in levels.items():
            _, r = record(method, 0, windows(level, steps))
            r["config"]["train"]["steps"] = steps
            r["cell_id"] += f"-{steps}"
            recs.append((f"{r['cell_id']}/result.json", r))
    recs.append(record("rtn", 0, windows(9.0, 5)))  # no training: in every budget
    s = analysis.stability(from_records(recs).df, PPL).set_index("train.steps")
    assert s.at[30, "ranking"] == "lrqat > peqa > rtn" and s.at[100, "ranking"] == "peqa > lrqat > rtn"
    assert s.at[100, "moved"] == "peqa overtakes lrqat" and s.at[300, "moved_since_previous"] == 0
    assert s.at[300, "resolved"] == 3  # one seed, but per-window data: resolved over the windows
    two = []  # the same budgets at 2 bits, where peqa never leads: each bit width ranks on its own
    for path, r in recs:
        r2 = copy.deepcopy(r)
        r2["config"]["bits"], r2["cell_id"] = 2, r["cell_id"] + "-w2"
        if r2["config"]["method"]["name"] == "peqa":
            r2["metrics"], r2["eval"] = {PPL: 1e5}, {}
        two.append((path + "2", r2))
    both = analysis.stability(from_records(recs + two).df, PPL)
    assert len(both) == 6 and set(both["bits"]) == {"2", "3"}
    w2 = both[both["bits"] == "2"].set_index("train.steps")
    assert w2.at[100, "ranking"] == "lrqat > rtn > peqa" and w2.at[100, "moved"] == ""
    assert both[both["bits"] == "3"].set_index("train.steps").at[100, "moved"] == "peqa overtakes lrqat"
    pw = analysis.pairwise(from_records(recs).df, PPL)
    rtn = pw[pw["worse"] == "rtn"]
    assert sorted(rtn["train.steps"].astype(float)) == [30, 30, 100, 100, 300, 300]  # rtn paired at every budget


def test_min_seeds_keeps_one_seed_unresolved(tmp_path, capsys, monkeypatch):
    a = U.Cells(PPL, [0], [20.0], [[np.asarray(windows(3.0, 0))]])
    b = U.Cells(PPL, [0], [33.0], [[np.asarray(windows(3.5, 1))]])
    assert U.compare(a, b, -1, min_seeds=1)["verdict"] == "holds"  # over the windows alone
    c = U.compare(a, b, -1)  # the default: 2 seeds
    assert c["verdict"] == "unresolved" and c["basis"] == "windows (1 seed); fewer than 2 seeds" and c["ci_low"] > 0
    monkeypatch.setattr(U, "MIN_SEEDS", 2)  # the CLI sets it; restored after the test
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--min-seeds", "0"])
    assert "--min-seeds=0: must be 1 or more" in capsys.readouterr().err


def test_paired_reads_the_records_items(tmp_path, capsys):
    from qexp.analysis.paired import item_scores, paired

    for method, em in (("gptq", "1000" * 25), ("lota", "1100" * 25)):
        rec = {"config": {"method": {"name": method}, "bits": 4},
               "eval": {"lm_eval": {"final": {"items": {"qexp_asdiv": {"exact_match": em}}}}}}
        (tmp_path / method).mkdir()
        (tmp_path / method / "result.json").write_text(__import__("json").dumps(rec))
    t = paired(item_scores(tmp_path, "qexp_asdiv"), "gptq-w4-s0").set_index("cell")
    assert t.at["lota-w4-s0", "diff"] == pytest.approx(0.25)
    assert (t.at["lota-w4-s0", "a_only"], t.at["lota-w4-s0", "b_only"]) == (25, 0)
    with pytest.raises(FileNotFoundError, match="neither in the records"):
        item_scores(tmp_path, "qexp_gsm8k")


def test_paired_keeps_seeds_apart_and_pools_them_over_items(tmp_path, capsys):
    """Two seeds of each cell are two columns (not one overwriting the other); each seed pairs with the
    baseline's same seed, and the pooled row averages each item's difference over the seeds."""
    import json

    from qexp.analysis.paired import item_scores, main, pooled

    ems = {("gptq", 0): "1000" * 25, ("gptq", 1): "0100" * 25,
           ("lota", 0): "1100" * 25, ("lota", 1): "0100" * 25}  # lota: +25 items at seed 0, +0 at seed 1
    for (method, seed), em in ems.items():
        rec = {"config": {"method": {"name": method}, "bits": 4, "seed": seed},
               "eval": {"lm_eval": {"final": {"items": {"qexp_asdiv": {"exact_match": em}}}}}}
        (tmp_path / f"{method}{seed}").mkdir()
        (tmp_path / f"{method}{seed}" / "result.json").write_text(json.dumps(rec))
    scores = item_scores(tmp_path, "qexp_asdiv")
    assert sorted(scores.columns) == ["gptq-w4-s0", "gptq-w4-s1", "lota-w4-s0", "lota-w4-s1"]
    p = pooled(scores, "gptq", "4").set_index("cell")
    assert p.at["lota-w4", "seeds"] == 2 and p.at["lota-w4", "items"] == 100
    assert p.at["lota-w4", "diff"] == pytest.approx(0.125)  # (0.25 + 0) / 2
    main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "| lota-w4-s0 | 100 | 50.0 | +25.0" in out and "| lota-w4-s1 | 100 | 25.0 | +0.0" in out
    assert "| lota-w4 | 2 | 100 | 37.5 | +12.5" in out
