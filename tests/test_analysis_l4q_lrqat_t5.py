"""The tables of issue 18: LR-QAT Table 5 takes each W-A-KV setting's cells beside the paper's column for
that setting; L4Q Table 1/10 reads qexp.plan's memory; the L4Q ablations find their variants' cells."""

from __future__ import annotations

import json

import pandas as pd

from qexp import analysis
from qexp.analysis.load import from_records
from tests.test_analysis import csv_value


def _rec(i: int, method: str, ppl: float, sweep: str, quant: dict | None = None, method_cfg: dict | None = None,
         bits: int = 4, group_size: int = -1) -> tuple[str, dict]:
    cfg = {"name": sweep, "model": {"name": "smollm2_135m"}, "method": {"name": method, **(method_cfg or {})},
           "bits": bits, "group_size": group_size, "seed": 0, "quant": quant or {}}
    return f"r{i}", {"status": "ok", "name": sweep, "cell_id": f"c{i}", "config": cfg,
                     "metrics": {"ppl/wikitext_sample/final": ppl}}


def test_lrqat_t5_each_setting_its_own_cells_and_paper_column():
    recs = [_rec(0, "rtn", 40.0, "lrqat_t5_embedded", {"act_bits": 8, "kv_bits": 16}),
            _rec(1, "lrqat", 30.0, "lrqat_t5_embedded", {"act_bits": 8, "kv_bits": 16}),
            _rec(2, "rtn", 90.0, "lrqat_t5_embedded", {"act_bits": 4, "kv_bits": 4}),
            _rec(3, "lrqat", 50.0, "lrqat_t5_embedded", {"act_bits": 4, "kv_bits": 4}),
            _rec(4, "rtn", 35.0, "lrqat_t5_sq_embedded", {"act_bits": 8, "kv_bits": 16, "smoothquant": True})]
    df = from_records(recs).df
    row = ("smollm2_135m", 4, -1, "LLaMA-2-7B")
    a8 = analysis.table(df, "lrqat_t5_w4a8").frame()
    a4 = analysis.table(df, "lrqat_t5_w4a4").frame()
    col = ("Wiki2 ppl", "rtn", "ours")
    assert a8.at[row, col] == 40.0 and a4.at[row, col] == 90.0  # each table: its own setting's cells
    assert a8.at[row, ("Wiki2 ppl", "smoothquant", "ours")] == 35.0  # the rtn + smoothquant cell, not rtn's
    base = {"paper": "LR-QAT", "table": "Table 5 (weight-activation)", "model": "LLaMA-2-7B", "method": "RTN",
            "dataset_or_task": "WikiText-2 test"}
    assert a8.at[row, ("Wiki2 ppl", "rtn", "paper")] == csv_value(**base, bits="4-8-8")
    assert a4.at[row, ("Wiki2 ppl", "rtn", "paper")] == csv_value(**base, bits="4-4-4")
    assert a4.at[row, ("Wiki2 ppl", "fp16", "paper")] == csv_value(**{**base, "method": "FP16"}, bits="16-16-16")
    kv4 = analysis.table(df, "lrqat_t5_w4a8kv4").frame()  # no cell at 8/4: ours empty, the paper's column shown
    assert pd.isna(kv4[("Wiki2 ppl", "rtn", "ours")]).all()


def test_l4q_t1_memory_comes_from_the_plan_json(tmp_path):
    cells = [{"cell": f"llama2_7b {m} w4g128", "overrides": ["+experiment=l4q_t1_paper", f"method=x/{m}"],
              "model": "llama2_7b", "method": m, "bits": 4, "group_size": 128, "peak_mb": mb,
              "stages_mb": {"train": mb}} for m, mb in [("lora", 26000.0), ("qat_lora", 43000.0), ("l4q", 26500.0)]]
    path = tmp_path / "plan" / "l4q_t1_paper.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"cells": cells}))
    for source in (path, tmp_path):  # the plan JSON itself, or a results directory holding plan/*.json
        t = analysis.table(analysis.load(source).df, "l4q_t1")
        f = t.frame()
        row = ("llama2_7b", 4, "LLaMA-1-7B")
        assert f.at[row, ("Memory GB", "qat_lora", "ours")] == 43000.0 / 1024
        assert f.at[row, ("Memory GB", "qat_lora", "paper")] == 41.9
        o = t.ordering.set_index(["better", "worse"])
        assert bool(o.at[("l4q", "qat_lora"), "agrees"])  # L4Q needs less than QAT-LoRA, as in the paper (a prediction)


def test_l4q_ablations_find_their_variant_cells():
    recs = [_rec(i, "l4q", 30.0 + i, "l4q_t4_embedded", method_cfg={"init": init, "rank": 4}, group_size=64)
            for i, init in enumerate(["l4q", "lsq", "symm", "asymm"])]
    recs += [_rec(10 + i, "l4q", 20.0 + i, "l4q_t56_embedded", method_cfg={"init": "l4q", "rank": r}, group_size=64)
             for i, r in enumerate([1, 8])]
    df = from_records(recs).df
    f = analysis.table(df, "l4q_t4").frame()
    row = ("smollm2_135m", 4, "LLaMA-2-7B")
    assert f.at[row, ("MMLU 5-shot", "l4q_init_lsq", "ours")] == 31.0  # perplexity proxy (no MMLU run)
    assert f.at[row, ("MMLU 5-shot", "l4q_init_l4q", "paper")] == 45.3
    g = analysis.table(df, "l4q_t56").frame()
    assert g.at[row, ("CSQA", "l4q_r8", "ours")] == 21.0 and pd.isna(g.at[row, ("CSQA", "l4q_r4", "ours")])
