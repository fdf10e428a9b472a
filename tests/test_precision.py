"""Every registered method in bf16 and fp16: trains, merges (honestly), evaluates and exports."""

import math

import pytest

from qexp.config import ConfigError, validate
from qexp.methods import registry
from qexp.run import run_cell
from tests.test_export import check_export_report

FAST = ["train.steps=2", "eval.base=false", "eval.max_windows=1"]
# On the grid, but the merge moves the adapter into float zero points: equal in real arithmetic
# only, so not bit-exact in any dtype (fp32 included). Every other on-grid method must stay lossless.
FLOAT_ROUNDED_MERGE = {"qalora"}


def _check_cell(rec: dict, name: str, dtype: str) -> None:
    assert rec["status"] == "ok", rec.get("error")
    assert rec["config"]["model"]["dtype"] == dtype
    assert rec["metrics"] and all(math.isfinite(v) for k, v in rec["metrics"].items() if k.startswith("ppl/"))
    assert all(math.isfinite(x) for x in rec["train"].get("losses", []))
    m = rec["merge"]
    assert m["logits_dtype"] == dtype  # the merge check compares in the model's own dtype
    assert m["lossless"] == (m["on_grid"] and name not in FLOAT_ROUNDED_MERGE), m
    assert (m["max_abs_logit_diff"] == 0.0) if m["lossless"] else math.isfinite(m["max_abs_logit_diff"])


@pytest.mark.parametrize("name", sorted(registry()))
def test_every_method_runs_in_bf16_and_exports(cfg_factory, name):
    """One bf16 cell per method: trains, merges honestly, evaluates, and exports (export=gptq)."""
    rec = run_cell(cfg_factory(f"method={name}", "model.dtype=bfloat16", "export=gptq", *FAST))
    _check_cell(rec, name, "bfloat16")
    check_export_report(rec)


# one method per fp16 code path (LoRA factors, QAT's master weight, L4Q's autograd, LR-QAT's
# checkpointed codes, LoTA's ternaries, PEQA's scales); all twelve pass, at ~6 s a cell on CPU
FP16 = ["l4q", "lora", "lota", "lrqat", "peqa", "qat"]


@pytest.mark.parametrize("name", FP16)
def test_methods_run_in_fp16(cfg_factory, name):
    """fp16 cannot hold AdamW's state: trainable tensors are fp32 there (the first step was NaN before)."""
    _check_cell(run_cell(cfg_factory(f"method={name}", "model.dtype=float16", *FAST)), name, "float16")


@pytest.mark.parametrize("name, export_dtype", [("l4q", "bfloat16"), ("qwha", "bfloat16"), ("lota", "float16")])
def test_export_all_from_a_bf16_cell(cfg_factory, name, export_dtype):
    rec = run_cell(cfg_factory(f"method={name}", "model.dtype=bfloat16", "bits=4", "export=all",
                               f"export.dtype={export_dtype}", *FAST))
    assert rec["status"] == "ok", rec.get("error")
    report = rec["export"]
    packed = ["gptq", "compressed"] if rec["merge"]["on_grid"] else []
    assert sorted(report["formats"]) == sorted(["fp16", *packed])
    same_dtype = export_dtype == "bfloat16"  # stored tensors in the model's dtype: nothing rounds
    for fmt in packed:
        exact = report["formats"][fmt]["verify"]["exact"]
        assert exact["codes_scales_zeros_equal"] and exact["logits_equal"]
        if same_dtype:
            assert exact["max_abs_logit_diff_vs_merged"] == 0.0
        assert report["formats"][fmt]["verify"]["format_only"]["logits_equal"]
    dense = report["formats"]["fp16"]["verify"]
    assert dense["logits_equal"]
    if same_dtype:  # the dense weight of every target, probed in bf16, is what the merged model uses
        assert dense["max_abs_logit_diff_vs_merged"] == 0.0


def test_model_dtype_outside_the_choices_is_a_config_error(cfg_factory):
    with pytest.raises(ConfigError, match="model.dtype='float64' is not valid; choose one of: float32, "
                                          "bfloat16, float16"):
        validate(cfg_factory("model.dtype=float64"))
