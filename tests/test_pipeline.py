"""Whole cells on tiny_random, config errors, a 2-cell multirun, and one short embedded cell."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import open_dict

from qexp.config import ConfigError, validate
from qexp.results import read
from qexp.run import run_cell, summary

ROOT = Path(__file__).resolve().parents[1]


def test_full_cell_on_tiny_random_writes_a_complete_record(cfg_factory):
    rec = run_cell(cfg_factory("method=peqa", "bits=3"))
    on_disk = read(Path(rec["dir"]) / "result.json")
    assert on_disk["status"] == "ok" and on_disk["cell_id"] == rec["cell_id"]
    for key in ("ppl/wikitext_sample/base", "ppl/wikitext_sample/final", "ppl/xsum/final"):
        assert on_disk["metrics"][key] > 1
    xsum = on_disk["eval"]["xsum"]
    assert {k: xsum[k] for k in ("seqlen", "windows", "tokens")} == {"seqlen": 64, "windows": 2, "tokens": 2 * 63}
    assert sorted(xsum["window_nll"]) == ["base", "final"]  # every perplexity stage keeps its windows' NLL
    assert all(len(v) == 2 for v in xsum["window_nll"].values())
    assert on_disk["merge"]["lossless"] is True
    assert len(on_disk["train"]["losses"]) == 3
    assert {"load_s", "quantize_s", "train_s", "merge_s", "total_s"} <= set(on_disk["timings"])
    assert on_disk["env"]["packages"]["torch"] and on_disk["memory"]["peak_rss_mb"] > 0
    assert "method=peqa" in summary(rec) and "lossless=True" in summary(rec)


def test_qlora_cell_reports_unmerged_and_requantized(cfg_factory):
    rec = run_cell(cfg_factory("method=qlora", "bits=2"))
    m = rec["metrics"]
    assert "ppl/xsum/unmerged" in m and "ppl/xsum/final" in m and m["ppl/xsum/unmerged"] != m["ppl/xsum/final"]
    assert rec["merge"]["deployed"] == "integer (re-quantized)" and rec["merge"]["lossless"] is False


def test_same_config_same_cell_dir_and_different_bits_different_dir(cfg_factory):
    from qexp.results import cell_dir

    a, b = cfg_factory("bits=3"), cfg_factory("bits=3")
    assert cell_dir(a) == cell_dir(b)
    assert cell_dir(cfg_factory("bits=2")) != cell_dir(a)
    assert cell_dir(cfg_factory("bits=3", "tracking=wandb_offline")) == cell_dir(a)  # W&B mode is not identity


def test_cell_id_ignores_fields_at_their_schema_default(cfg_factory):
    """A config field added later with a default must not change existing cells' ids."""
    from omegaconf import OmegaConf

    from qexp.config import Config
    from qexp.results import cell_id

    a = cfg_factory("method=lrqat")
    b = OmegaConf.to_container(a)
    del b["quant"]["grid"], b["train"]["checkpoint_every"], b["method"]["phi"]  # all at their defaults
    assert cell_id(OmegaConf.merge(OmegaConf.structured(Config), b)) == cell_id(a)
    assert cell_id(cfg_factory("method=lrqat", "method.phi=bf16")) != cell_id(a)
    assert cell_id(cfg_factory("method=lrqat", "quant.grid=50")) != cell_id(a)


def test_a_cell_done_in_another_sweep_is_reused_not_rerun(cfg_factory):
    first = run_cell(cfg_factory("method=rtn", "name=sweep_a"))
    again = run_cell(cfg_factory("method=rtn", "name=sweep_b"))
    assert again["reused_from"] == first["dir"] and again["metrics"] == first["metrics"]
    assert Path(again["dir"]).parent.name == "sweep_b" and read(Path(again["dir"]) / "result.json")["name"] == "sweep_b"
    forced = run_cell(cfg_factory("method=rtn", "name=sweep_c", "force=true"))
    assert "reused_from" not in forced and forced["metrics"] == first["metrics"]


@pytest.mark.parametrize("override, message", [
    ("bits=5", "bits=5 is not valid; choose one of: 2, 3, 4, 8"),
    ("group_size=0", "group_size=0 is not valid"),
    ("quant.init=awq", "quant.init='awq' is not valid; choose one of: rtn, gptq"),
    ("tracking.mode=cloud", "tracking.mode='cloud' is not valid; choose one of: offline, online, disabled"),
])
def test_bad_values_fail_before_any_work(cfg_factory, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate(cfg_factory(override))


def test_unknown_method_key_names_valid_keys(cfg_factory):
    cfg = cfg_factory("method=lora")
    with open_dict(cfg):
        cfg.method.rnak = 4
    with pytest.raises(ConfigError, match="method=lora: .*rnak.*Valid keys: name, rank, alpha"):
        validate(cfg)


def test_group_size_that_does_not_divide_a_layer_is_refused_before_work(cfg_factory):
    cfg = cfg_factory("group_size=48")  # tiny_random layers have d_in 64 and 128 (read from model.random)
    with pytest.raises(ConfigError, match="group_size=48 does not divide .*in_features=64; valid for this model: "
                                          "16, 32, 64, -1"):
        run_cell(cfg)
    assert not Path(cfg.results_dir).exists()  # a config error writes no record


def test_an_error_during_the_work_is_recorded_as_failed(cfg_factory, tmp_path):
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "a sentence."}\n')
    cfg = cfg_factory("data.eval.xsum.kind=files", f"data.eval.xsum.files=[{texts}]", "data.eval.xsum.column=nope")
    with pytest.raises(ConfigError, match="column='nope' is not a column"):
        run_cell(cfg)
    data = read(next(Path(cfg.results_dir).rglob("result.json")))
    assert data["status"] == "failed" and "column='nope'" in data["error"] and "Traceback" in data["traceback"]


def _cli(*args, cwd=ROOT, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "qexp.run", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_unknown_group_choice_lists_options(tmp_path):
    r = _cli("method=nope", f"results_dir={tmp_path}")
    assert r.returncode != 0
    assert "Could not find 'method/nope'" in r.stderr and "peqa" in r.stderr


def test_two_cell_multirun_writes_two_records(tmp_path):
    from .conftest import TINY

    r = _cli("--multirun", "method=rtn,peqa", *TINY, f"results_dir={tmp_path}", f"hydra.sweep.dir={tmp_path}/hydra")
    assert r.returncode == 0, r.stderr[-2000:]
    recs = [json.loads(p.read_text()) for p in tmp_path.rglob("result.json")]
    assert sorted(r["config"]["method"]["name"] for r in recs) == ["peqa", "rtn"]
    assert all(r["status"] == "ok" for r in recs)


@pytest.mark.slow
def test_embedded_cell_end_to_end(tmp_path):
    """The real embedded model, a few steps: the default cell's path, shortened."""
    r = _cli("method=peqa", "bits=3", "train.steps=3", "eval.max_windows=2", "tracking=wandb_offline",
             f"results_dir={tmp_path}", "hydra.run.dir=" + str(tmp_path / "hydra"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "method=peqa model=smollm2_135m bits=3" in r.stdout
    rec = read(next(tmp_path.rglob("result.json")))
    m = rec["metrics"]
    assert rec["status"] == "ok" and rec["merge"]["lossless"]
    assert 5 < m["ppl/wikitext_sample/base"] < 500  # a real language model, not random (vocab 49152)
    assert list(Path(rec["dir"]).glob("wandb/offline-run-*"))  # the offline W&B run is there to sync
