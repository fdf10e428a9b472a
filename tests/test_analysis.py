"""qexp.analysis on a hand-written fixture of records (tests/fixtures/records/fixture: 11 ok cells of
smollm2_135m, one failed, one running, one torn write)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from qexp import analysis
from qexp.analysis import metrics as M
from qexp.analysis.__main__ import main
from qexp.analysis.plots import pareto

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "records"
ROW3 = ("smollm2_135m", 3, "Llama-3.1-8B-Instruct")  # lota_t1 row: ours at 3 bits beside the paper's model


@pytest.fixture(scope="module")
def res() -> analysis.Results:
    return analysis.load(FIXTURE)


def csv_value(**where: str) -> float:
    """The paper's number straight from the shipped CSV (independent of the table code)."""
    df = pd.read_csv(ROOT / "qexp" / "analysis" / "paper_tables.csv", dtype=str)
    for k, v in where.items():
        df = df[df[k] == v]
    assert len(df) == 1, where
    return float(df["value"].iloc[0])


def test_load_tidy_frame(res):
    df = res.df
    assert df["cell_id"].nunique() == 11
    assert list(df.columns[:13]) == ["sweep", "model", "method", "bits", "group_size", "seed", "dataset", "cell_id",
                                     "metric", "kind", "target", "stage", "value"]
    assert str(df["bits"].dtype) == "Int64" and set(df["bits"]) == {2, 3}
    assert {"train.lr", "quant.init", "eval.seqlen"} <= set(df.columns)  # config flattened
    one = df[(df["method"] == "lota") & (df["bits"] == 3)].set_index("metric")
    assert one.at["acc/mmlu5/final", "value"] == 0.285
    assert tuple(one.loc["acc/mmlu5_stem/fp", ["kind", "target", "stage"]]) == ("acc", "mmlu5_stem", "fp")
    assert one.at["time/train", "value"] == 30.0 and one.at["mem/peak_rss_mb", "value"] == 1000.0
    assert one.at["size/model_bytes", "value"] == 75e6 and one.at["merge/lossless", "value"] == 1.0
    # one row per cell x metric: a cell's rows are exactly its metrics plus its record sections
    rec = json.loads(next((FIXTURE / "fixture").glob("smollm2_135m-lota-w3g64-*/result.json")).read_text())
    assert set(one.index) >= set(rec["metrics"]) and not one.index.duplicated().any()
    cells = res.cells()
    assert len(cells) == 11 and cells.set_index(["method", "bits"]).at[("rtn", 2), "ppl/wikitext_sample/final"] == 900


def test_failed_and_corrupt_listed_apart(res):
    assert sorted(res.failed["status"]) == ["corrupt", "failed", "running"]
    failed = res.failed.set_index("status")
    assert failed.at["failed", "error"] == "RuntimeError: CUDA out of memory"
    assert "JSONDecodeError" in failed.at["corrupt", "error"]
    assert not res.df["method"].isin(["l4q", "qwha"]).any()  # the failed cell's partial ppl never leaks in
    assert not (res.df["bits"] == 4).any()  # nor the torn record


def test_metric_names_parse_and_direction():
    assert M.parse("ppl/wikitext2/final") == M.Metric("ppl/wikitext2/final", "ppl", "wikitext2", "final")
    assert M.parse("acc,none/boolq").name == "acc/boolq"  # lm-eval's filter suffix, no stage
    assert M.parse("acc/mmlu5_humanities/base").target == "mmlu5_humanities"
    assert (M.direction("ppl/c4/final"), M.direction("acc_norm/csqa7/final"), M.direction("time/train")) == (-1, 1, -1)
    assert M.direction("merge/lossless") == 1 and M.direction("merge/merged_layers") is None
    assert M.scale("acc/mmlu5/final") == 100 and M.scale("ppl/c4/final") == 1
    assert M.pick({"acc/mmlu5_offline/final"}, ["acc/mmlu5", "acc/mmlu5_offline"], "final") == "acc/mmlu5_offline/final"
    assert M.is_standin("acc/csqa7_offline/final") and not M.is_standin("acc/csqa7/final")


def test_lota_table_has_paper_values_in_the_right_cells(res):
    t = analysis.table(res.df, "lota_t1")
    f = t.frame()
    llama = {"paper": "LoTA-QAF", "table": "Table 1", "model": "Llama-3.1-8B-Instruct", "group_size": "64"}
    ft = " (5-shot; after Alpaca performance-recovery FT)"
    assert f.at[ROW3, ("Avg", "lota", "paper")] == csv_value(**llama, bits="3", method="LoTA-QAF",
                                                             dataset_or_task="MMLU Avg" + ft)
    assert f.at[ROW3, ("STEM", "qalora", "paper")] == csv_value(**llama, bits="3", method="QA-LoRA",
                                                                dataset_or_task="MMLU STEM" + ft)
    assert f.at[ROW3, ("Hum.", "gptq", "paper")] == csv_value(**llama, bits="3", method="GPTQ",
                                                              dataset_or_task="MMLU Humanities (5-shot)")
    assert f.at[ROW3, ("Avg", "qlora", "paper")] == csv_value(**llama, bits="3+16", method="GPTQ+LoRA",
                                                              dataset_or_task="MMLU Avg" + ft)
    assert f.at[ROW3, ("Avg", "fp16", "paper")] == csv_value(paper="LoTA-QAF", table="Table 1", bits="16",
                                                             model="Llama-3.1-8B-Instruct", method="16-bit base",
                                                             dataset_or_task="MMLU Avg (5-shot)")
    # ours: x100, qlora from its unmerged (16-bit adapter) stage, fp16 from the fp stage
    assert f.at[ROW3, ("Avg", "lota", "ours")] == pytest.approx(28.5)
    assert f.at[ROW3, ("Avg", "qlora", "ours")] == pytest.approx(28.0)
    assert f.at[ROW3, ("Avg", "fp16", "ours")] == pytest.approx(30.0)
    assert pd.isna(f.at[("smollm2_135m", 2, "Llama-3.1-8B-Instruct"), ("Avg", "gptq", "ours")])
    md = t.markdown()
    assert "28.50 [55.89]" in md and "Different models" in md and "ORDERING" in md
    assert "quant.init=rtn" in md  # the fixture's qlora did not use the paper's GPTQ base: said so
    assert "\\begin{table}" in t.latex() and "55.89" in t.latex()
    # no unmerged accuracy for qlora (eval.accuracy_stages without it): the merged value, and a note saying so
    df = res.df[~((res.df["method"] == "qlora") & (res.df["metric"] == "acc/mmlu5/unmerged"))]
    t = analysis.table(df, "lota_t1")
    assert t.frame().at[ROW3, ("Avg", "qlora", "ours")] == pytest.approx(26.0)
    assert "qlora: no `unmerged` value for Avg, its `final` shown" in t.notes
    # a record from before quant.init was recorded (the key is missing, pandas' NaN): named, not a crash
    old = res.df.copy()
    old.loc[old["method"] == "qlora", "quant.init"] = None
    assert "qlora ran with quant.init=nan" in analysis.table(old, "lota_t1").markdown()


def test_lrqat_table_granularity_and_paper_only_layout(res):
    f = analysis.table(res.df, "lrqat_t4").frame()
    row = ("smollm2_135m", 3, 64, "LLaMA-2-7B")  # ours g64 beside the paper's g128 (576 is not divisible by 128)
    base = {"paper": "LR-QAT", "table": "Table 4 (weight-only)", "model": "LLaMA-2-7B", "bits": "3"}
    assert f.at[row, ("Wiki2 ppl", "rtn", "paper")] == csv_value(**base, group_size="128", method="RTN",
                                                                 dataset_or_task="WikiText-2 test")
    assert f.at[row, ("Wiki2 ppl", "peqa", "ours")] == 26.0
    empty = analysis.table(res.df.iloc[:0], "lrqat_t4").frame()  # no records: the paper's layout, ours empty
    pc = ("LLaMA-2-7B", 2, -1, "LLaMA-2-7B")
    assert empty.at[pc, ("Wiki2 ppl", "rtn", "paper")] == 5200.0 and pd.isna(empty.at[pc, ("Wiki2 ppl", "rtn", "ours")])
    with pytest.raises(KeyError, match="choose one of: lota_t1"):
        analysis.table(res.df, "lota_t9")
    with pytest.raises(KeyError, match="paper_model='GPT-5'.*LLaMA-2-7B"):
        analysis.table(res.df, "lrqat_t4", paper_model="GPT-5")


def swap(df: pd.DataFrame, metric: str, bits: int, a: str, b: str) -> pd.DataFrame:
    df = df.copy()
    ia = df.index[(df["method"] == a) & (df["bits"] == bits) & (df["metric"] == metric)]
    ib = df.index[(df["method"] == b) & (df["bits"] == bits) & (df["metric"] == metric)]
    df.loc[ia, "value"], df.loc[ib, "value"] = df.loc[ib, "value"].to_numpy(), df.loc[ia, "value"].to_numpy()
    return df


def test_ordering_check_flips_with_the_values(res):
    def pair(t: analysis.Table, col: str, a: str, b: str) -> bool:
        o = t.ordering[(t.ordering["bits"] == 3) & (t.ordering["column"] == col)]
        hit = o[o["better"].isin([a, b]) & o["worse"].isin([a, b])]
        assert len(hit) == 1
        return bool(hit["agrees"].iloc[0])

    t = analysis.table(res.df, "lota_t1")
    assert pair(t, "Avg", "lota", "qalora") and not pair(t, "STEM", "qalora", "qlora")
    # one seed and records without per-item data: every ordering unresolved, the point estimates still counted
    assert t.direction()[ROW3] == "0 hold, 0 flip, 50 unresolved of 50; point estimates in the paper's order: 48/50"
    assert set(t.ordering["verdict"]) == {"unresolved"} and t.ordering["basis"].str.startswith("none: 1 seed").all()
    flipped = analysis.table(swap(res.df, "acc/mmlu5/final", 3, "lota", "qalora"), "lota_t1")
    assert not pair(flipped, "Avg", "lota", "qalora")
    assert flipped.direction()[ROW3].endswith("in the paper's order: 45/50")  # + lota/qlora and qlora/qalora on Avg
    # lower-is-better metrics: perplexity
    t = analysis.table(res.df, "lrqat_t4")
    assert pair(t, "Wiki2 ppl", "peqa", "lrqat")
    assert not pair(analysis.table(swap(res.df, "ppl/wikitext_sample/final", 3, "peqa", "lrqat"), "lrqat_t4"),
                    "Wiki2 ppl", "peqa", "lrqat")


def test_wandb_export_csv(tmp_path):
    rows = [{"Name": "a1", "State": "finished", "name": "sw", "model.name": "smollm2_135m", "method.name": "lota",
             "bits": 2, "group_size": 64, "seed": 0, "ppl/wikitext2/final": 12.5, "acc/mmlu5/final": 0.3,
             "_runtime": 40},
            {"Name": "a2", "State": "crashed", "name": "sw", "model.name": "smollm2_135m", "method.name": "peqa",
             "bits": 2, "group_size": 64, "seed": 0, "ppl/wikitext2/final": None, "acc/mmlu5/final": None,
             "_runtime": 3}]
    pd.DataFrame(rows).to_csv(tmp_path / "export.csv", index=False)
    res = analysis.load(tmp_path / "export.csv")
    assert sorted(res.df["metric"]) == ["acc/mmlu5/final", "ppl/wikitext2/final"]
    assert set(res.df["method"]) == {"lota"} and res.df["bits"].iloc[0] == 2
    assert list(res.failed["status"]) == ["failed"] and list(res.failed["method"]) == ["peqa"]
    with pytest.raises(FileNotFoundError, match="not a directory of result.json"):
        analysis.load(tmp_path / "nope")


def test_cli_plots_and_files(tmp_path, capsys):
    bench = ROOT / "results" / "bench" / "bench.json"
    assert main([str(FIXTURE), "--table", "lrqat_t4", "--table", "lota_t1", "--out", str(tmp_path),
                 "--bench", str(bench)]) == 0
    out = capsys.readouterr().out
    assert "3 not ok" in out and "16 unresolved of 16; point estimates in the paper's order: 16/16" in out
    for f in ("records.csv", "cells.csv", "lrqat_t4.md", "lrqat_t4.tex", "lota_t1.csv", "metric_vs_bits.png",
              "pareto.png", "cost.png"):
        assert (tmp_path / f).stat().st_size > 0, f
    assert main(["--list"]) == 0 and "qwha_t3" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(FIXTURE), "--table", "lota_t9"])
    assert "choose one of: lota_t1" in capsys.readouterr().err


def test_pareto_front():
    x, y = pd.Series([1.0, 2.0, 3.0, 2.5]), pd.Series([0.5, 0.4, 0.7, 0.8])
    assert list(pareto(x, y, +1)) == [0, 3]
    assert list(pareto(x, y, -1)) == [0, 1]  # lower is better (perplexity)


def test_log_table_offline(res, tmp_path):
    run_dir = Path(analysis.log_table(analysis.table(res.df, "lota_t1"), group="fixture", dir=tmp_path))
    tables = list(run_dir.glob("files/media/table/lota_t1_*.table.json"))
    assert len(tables) == 1
    logged = json.loads(tables[0].read_text())
    assert "direction" in logged["columns"] and len(logged["data"]) == 2


def test_notebook_runs_headless(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    monkeypatch.setenv("QEXP_RESULTS", str(FIXTURE))
    monkeypatch.setenv("QEXP_ANALYSIS_OUT", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(ROOT / "notebooks" / "analysis.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = json.dumps([o.get("data", {}).get("text/markdown", "") for o in outputs])
    assert "point estimates in the paper's order: 48/50" in text and "unresolved" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 4  # vs bits, Pareto, losses, cost (no budget)
    for name in ("metric_vs_bits", "pareto", "losses", "cost"):
        assert (tmp_path / f"{name}.png").exists(), name


def test_compare_grid_base_to_final_and_against_a_baseline(res, tmp_path, capsys):
    t = analysis.compare(res.df, "ppl/wikitext_sample", baseline="rtn")
    assert t.loc[("peqa", 64), (2, "base")] == 78.0 and t.loc[("peqa", 64), (2, "final")] == 60.0
    assert t.loc[("peqa", 64), (2, "vs rtn")] == True  # noqa: E712  (60 < rtn's 900: lower ppl is better)
    assert pd.isna(t.loc[("rtn", 64), (2, "vs rtn")])  # the baseline is not compared with itself
    worse = res.df.copy()
    worse.loc[(worse["method"] == "peqa") & (worse["metric"] == "ppl/wikitext_sample/final") & (worse["bits"] == 2),
              "value"] = 1000.0
    assert analysis.compare(worse, "ppl/wikitext_sample", baseline="rtn").loc[("peqa", 64), (2, "vs rtn")] == False  # noqa: E712
    md = analysis.compare_markdown(t, "ppl/wikitext_sample")
    assert "| peqa | 64 | 78.00 → 60.00 | yes |" in md
    assert main([str(FIXTURE), "--compare", "ppl/wikitext_sample", "--baseline", "rtn", "--no-plots",
                 "--out", str(tmp_path)]) == 0
    assert (tmp_path / "compare_ppl_wikitext_sample.md").read_text() == md
    with pytest.raises(SystemExit):
        main([str(FIXTURE), "--compare", "ppl/nope", "--out", str(tmp_path)])
    assert "ppl/nope" in capsys.readouterr().err
    # a metric without stages: one value per bit width, taken from the record as is
    diff = analysis.compare(res.df, "merge/max_abs_logit_diff")
    want = res.df[(res.df["metric"] == "merge/max_abs_logit_diff") & (res.df["method"] == "peqa")
                  & (res.df["bits"] == 2)]["value"].iloc[0]
    assert diff.loc[("peqa", 64), (2, "value")] == want
    assert "| method | group | W2 |" in analysis.compare_markdown(diff, "merge/max_abs_logit_diff")


def test_compare_keeps_cells_apart_that_differ_in_a_config_value(res):
    peqa = res.df[res.df["method"] == "peqa"].copy()
    peqa["cell_id"] += "-lr2"
    peqa["train.lr"] = 123.0
    peqa["value"] *= 2
    t = analysis.compare(pd.concat([res.df, peqa]), "ppl/wikitext_sample")
    assert "train.lr" in t.index.names
    rows = t.xs("peqa", level="method")[(2, "final")]
    assert sorted(rows.tolist()) == [60.0, 120.0]


def test_perplexity_proxy_where_no_record_has_the_papers_metric(res):
    def lota_beats_gptq(t: analysis.Table) -> bool:
        o = t.ordering[(t.ordering["bits"] == 3) & (t.ordering["column"] == "Avg")]
        hit = o[(o["better"] == "lota") & (o["worse"] == "gptq")]  # the paper: LoTA-QAF above GPTQ
        assert len(hit) == 1
        return bool(hit["agrees"].iloc[0])

    assert not analysis.table(res.df, "lota_t1").values["proxy"].any()  # accuracy present: no proxy
    ppl_only = res.df[~res.df["metric"].str.startswith("acc")]
    t = analysis.table(ppl_only, "lota_t1")
    row = t.values[(t.values["bits"] == 3) & (t.values["column"] == "Avg")].set_index("method")
    assert row["proxy"].all() and row.at["lota", "ours_metric"] == "ppl/wikitext_sample/final"
    ppl = ppl_only[(ppl_only["metric"] == "ppl/wikitext_sample/final") & (ppl_only["bits"] == 3)]
    lota, gptq = (ppl.loc[ppl["method"] == m, "value"].mean() for m in ("lota", "gptq"))
    assert row.at["lota", "ours"] == pytest.approx(lota)
    assert lota_beats_gptq(t) == (lota < gptq)  # lower perplexity is better
    flipped = analysis.table(swap(ppl_only, "ppl/wikitext_sample/final", 3, "lota", "gptq"), "lota_t1")
    assert lota_beats_gptq(flipped) != lota_beats_gptq(t)
    assert "ppl " in t.markdown() and "**Proxy**" in t.markdown()


def test_a_table_uses_only_its_own_experiments_when_present(res):
    base = analysis.table(res.df, "lota_t1").values.set_index(["bits", "column", "method"])["ours"]
    own = res.df.assign(sweep="lota_t1_embedded")
    other = res.df.assign(sweep="lr_study", value=res.df["value"] * 3)  # e.g. an lr sweep of the same methods
    t = analysis.table(pd.concat([own, other], ignore_index=True), "lota_t1")
    got = t.values.set_index(["bits", "column", "method"])["ours"]
    pd.testing.assert_series_equal(got, base)  # the other sweep's cells are not averaged in
    assert any("lota_t1_embedded only" in n for n in t.notes)
    # no own sweep: all cells; an lr study's cells differ in more than seed, so they are not averaged: said so
    lr = other.assign(cell_id=other["cell_id"] + "-lr", **{"train.lr": 0.5})
    with pytest.raises(analysis.MixedSettings, match=r"method=lota.*differ in more than seed \(train.lr: 0.0001, 0.5"):
        analysis.table(pd.concat([res.df, lr], ignore_index=True), "lota_t1")


def test_every_model_config_is_named_in_the_table_registry():
    """A paper-scale model missing from tables.yaml would print its cells beside no paper row."""
    from qexp.analysis.tables import registry

    names = {p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")}
    missing = names - set(registry()["models"])
    assert not missing, f"conf/model/ models not in qexp/analysis/tables.yaml models: {sorted(missing)}"
    csv_models = set(pd.read_csv(ROOT / "qexp" / "analysis" / "paper_tables.csv", dtype=str)["model"])
    for model, aliases in registry()["models"].items():
        assert set(aliases or []) <= csv_models, (model, aliases)


def test_every_table_renders_from_the_committed_records():
    """What the notebook does on the repository's own results: each table from its sweeps' records (all
    records where its sweeps have none) either renders or refuses mixed settings; nothing else raises."""
    from qexp.analysis.tables import spec

    results = ROOT / "results"
    everything = analysis.load(results).df
    for name in analysis.list_tables()["name"]:
        dirs = [results / s for s in spec(name).get("sweeps", []) if (results / s).is_dir()]
        try:
            t = analysis.table(analysis.load(dirs).df if dirs else everything, name)
        except analysis.MixedSettings:
            continue
        assert t.markdown(), name
