"""qexp.bench: one command writes the tables (JSON + Markdown), ratios are to LoRA, bad input is named."""

from __future__ import annotations

import json
import math

import pytest

from qexp.bench.cli import main, run_job

TINY = ["--model", "tiny_random", "--batch", "1", "--seqlen", "32", "--group-size", "32", "--shapes", "64x128",
        "--tokens", "16", "--repeats", "2", "--steps", "1", "--warmup", "0", "--mem-steps", "1",
        "--set", "quant.calib_samples=4", "--set", "quant.calib_seqlen=32"]


def test_bench_writes_json_and_markdown_with_ratios_to_lora(tmp_path, capsys):
    out = tmp_path / "bench"
    main(["--scale", "both", "--methods", "peqa,rtn", "--no-isolate", "--out", str(out), *TINY])
    assert (out / "bench.json").exists() and (out / "bench.md").exists()
    saved = json.loads((out / "bench.json").read_text())
    assert saved["methods"] == ["lora", "peqa", "rtn"]  # LoRA, the reference, is always added
    assert set(saved["scales"]) == {"model", "layer"}
    md = (out / "bench.md").read_text()
    assert md in capsys.readouterr().out  # printed, too
    assert "| method | setup s | step ms | ×LoRA |" in md and "python -m qexp.bench --scale both" in md
    for scale, res in saved["scales"].items():
        rows = {r["method"]: r for r in res["rows"]}
        assert set(rows) == {"fp", "lora", "peqa", "rtn"}
        assert not any("error" in r for r in rows.values())
        lora = rows["lora"]
        assert lora["x_lora_step"] == 1.0
        # in-process (--no-isolate) RSS deltas may be <= 0 (reused heap pages): then no memory ratio at all
        assert lora["x_lora_mem"] == 1.0 if lora["peak_mb"] > 0 else lora["x_lora_mem"] is None
        assert len(rows["peqa"]["rounds"]) == 2  # one entry per interleaved round
        for name in ("lora", "peqa"):  # trainable: every number present and finite
            r = rows[name]
            for key in ("setup_s", "step_ms", "fwd_ms", "bwd_ms", "opt_ms", "peak_mb", "state_mb", "eval_tok_s",
                        "x_lora_step", "x_fp_eval"):
                assert isinstance(r[key], float) and math.isfinite(r[key]), (scale, name, key, r.get(key))
        assert rows["rtn"].get("step_ms") is None and math.isfinite(rows["rtn"]["x_fp_eval"])  # eval/setup only
        assert rows["fp"]["x_fp_eval"] == 1.0
    layer = {r["method"]: r for r in saved["scales"]["layer"]["rows"]}
    assert layer["peqa"]["shape"] == [64, 128] and layer["peqa"]["deployed"] == "QuantLinear"
    assert any("merged integer eval" in t for t in saved["targets"])


def test_memory_ratio_is_none_when_an_in_process_rss_delta_is_not_positive():
    """A negative RSS delta (reused heap pages) gives no ratio, not a misleading 1.0 for LoRA against itself."""
    from qexp.bench.report import summarize

    rows = [{"method": "lora", "peak_mb": -3.0, "step_ms": 2.0}, {"method": "peqa", "peak_mb": 5.0, "step_ms": 4.0}]
    summarize(rows, "lora")
    assert [r["x_lora_mem"] for r in rows] == [None, None]
    assert [r["x_lora_step"] for r in rows] == [1.0, 2.0]


def test_isolated_worker_process_round_trips(tmp_path):
    """The per-method job in a fresh process (the default): its pickles load back here."""
    import torch

    from qexp.bench.worker import layer_inputs, layer_step_fns

    job = {"scale": "layer", "method": "peqa", "overrides": ["bits=3", "group_size=32", "quant.init=rtn"],
           "tmp": str(tmp_path), "mem_steps": 1, "shapes": [[64, 32]], "tokens": 8, "calib_tokens": 64,
           "calib_max_din": None}
    (row,) = run_job(job, tmp_path, isolate=True)
    assert "error" not in row, row.get("error")
    assert row["peak_mb"] > 0 and row["state_mb"] > 0
    holder = torch.load(row["train"], weights_only=False)
    fwd, bwd = layer_step_fns(holder.layer, *layer_inputs(64, 32, 8, torch.device("cpu")))
    bwd(fwd())
    assert holder.layer.scale.grad is not None


def test_bad_methods_name_the_value_and_the_choices(capsys):
    with pytest.raises(SystemExit):
        main(["--methods", "lora,loraa"])
    err = capsys.readouterr().err
    assert "--methods: 'loraa' is not valid" in err and "choose from: all," in err and "peqa" in err


def test_bad_shape_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--scale", "layer", "--shapes", "4096by4096"])
    assert "--shapes: '4096by4096' is not valid; write D_INxD_OUT" in capsys.readouterr().err


def test_render_rewrites_markdown_from_json(tmp_path):
    saved = {"date": "d", "machine": {"cpu": "c", "cpu_count": 1, "torch_threads": 1, "torch": "t", "device": "cpu"},
             "command": "python -m qexp.bench", "methods": ["lora", "peqa"], "scales": {"model": {
                 "settings": {"model": "m", "batch": 1, "seqlen": 8, "bits": 3, "group_size": 64, "repeats": 1,
                              "warmup": 0, "steps": 1, "overrides": []},
                 "rows": [{"method": "lora", "step_ms": 10.0, "x_lora_step": 1.0},
                          {"method": "peqa", "step_ms": 16.0, "x_lora_step": 1.6}]}}}
    (tmp_path / "bench.json").write_text(json.dumps(saved))
    main(["--render", str(tmp_path / "bench.json")])
    md = (tmp_path / "bench.md").read_text()
    assert "step ≤ 1.15× LoRA missed by peqa: model 1.60× ✗ (> 1.5× somewhere). Why: ∂L/∂s" in md
    assert "written again from bench.json" in md
