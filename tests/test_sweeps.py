"""Sweeps that survive: skip-done, failure records, resume after SIGKILL, launchers."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from qexp.results import read
from qexp.run import run_cell

from .conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, timeout=600, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "qexp.run", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


def test_finished_cell_is_skipped_and_force_reruns(cfg_factory):
    first = run_cell(cfg_factory("method=rtn"))
    path = Path(first["dir"]) / "result.json"
    mtime = path.stat().st_mtime_ns
    again = run_cell(cfg_factory("method=rtn"))
    assert again["started"] == first["started"] and path.stat().st_mtime_ns == mtime
    forced = run_cell(cfg_factory("method=rtn", "force=true"))
    assert forced["started"] != first["started"] or path.stat().st_mtime_ns != mtime


def test_a_cell_that_fails_at_work_records_it_and_the_sweep_goes_on(tmp_path):
    texts = tmp_path / "texts.jsonl"  # a column only reading the file finds missing
    texts.write_text("".join(json.dumps({"text": f"sentence number {i} of a small local corpus."}) + "\n"
                             for i in range(400)))
    r = _cli("--multirun", "method=rtn", "data.eval.xsum.column=nope,text", "data.eval.xsum.kind=files",
             f"data.eval.xsum.files=[{texts}]", *TINY, f"results_dir={tmp_path}/r", f"hydra.sweep.dir={tmp_path}/h")
    assert r.returncode != 0  # the sweep reports failure at the end
    recs = sorted((read(p) for p in (tmp_path / "r").rglob("result.json")), key=lambda x: x["status"])
    assert [x["status"] for x in recs] == ["failed", "ok"]
    assert "column='nope' is not a column" in recs[0]["error"]
    assert "1 of 2 cells failed" in r.stderr


def test_sigkill_mid_training_then_rerun_resumes_to_the_same_result(tmp_path):
    args = ["method=peqa", *TINY, "train.steps=12", "train.checkpoint_every=2", "train.log_every=1",
            "hydra.run.dir=" + str(tmp_path / "hydra")]
    ref = _cli(*args, f"results_dir={tmp_path}/ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    expected = read(next((tmp_path / "ref").rglob("result.json")))

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "qexp.run", *args, f"results_dir={tmp_path}/cut"], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((tmp_path / "cut").rglob("checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = next((tmp_path / "cut").rglob("checkpoint.pt"))
    import torch

    killed_at = torch.load(ckpt, weights_only=False)["step"]
    assert 0 < killed_at < 12
    assert read(next((tmp_path / "cut").rglob("result.json")))["status"] == "running"  # no chance to write more

    again = _cli(*args, f"results_dir={tmp_path}/cut")
    assert again.returncode == 0, again.stderr[-2000:]
    resumed = read(next((tmp_path / "cut").rglob("result.json")))
    assert resumed["status"] == "ok" and resumed["train"]["resumed_from"] >= killed_at
    assert resumed["train"]["losses"] == expected["train"]["losses"]
    assert resumed["metrics"] == expected["metrics"]
    assert not list((tmp_path / "cut").rglob("checkpoint.pt"))  # cleaned up after success


def test_rerunning_a_finished_sweep_runs_nothing(tmp_path):
    sweep = ["--multirun", "method=rtn,peqa", *TINY, f"results_dir={tmp_path}", f"hydra.sweep.dir={tmp_path}/h"]
    assert _cli(*sweep).returncode == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("result.json")}
    r = _cli(*sweep)
    assert r.returncode == 0 and (r.stdout + r.stderr).count("already done") == 2
    assert {p: p.read_bytes() for p in tmp_path.rglob("result.json")} == before


def test_submitit_local_launcher_runs_a_sweep(tmp_path):
    r = _cli("--multirun", "hydra/launcher=submitit_local", "method=rtn,peqa", *TINY, f"results_dir={tmp_path}",
             f"hydra.sweep.dir={tmp_path}/h", "hydra.launcher.timeout_min=10")
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(p.read_text()) for p in tmp_path.rglob("result.json")]
    assert sorted(x["status"] for x in recs) == ["ok", "ok"]


def test_sigterm_outside_training_records_the_interruption(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    args = [*TINY, "method=rtn", "eval.max_windows=50", f"results_dir={tmp_path}", f"hydra.run.dir={tmp_path}/h"]
    proc = subprocess.Popen([sys.executable, "-m", "qexp.run", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in proc.stdout:  # the stage progress lines
        if ": eval_base ..." in line:
            break
    proc.send_signal(signal.SIGTERM)  # inside evaluation, before any training
    proc.stdout.read()
    assert proc.wait(timeout=120) != 0
    rec = read(next(tmp_path.rglob("result.json")))
    assert rec["status"] == "preempted" and rec["error"].startswith("Interrupted: signal SIGTERM")
    assert rec["preempted"]["stage"] == "eval_base" and rec["preempted"]["step"] == 0


def test_ctrl_c_mid_training_is_preempted_with_its_step_and_checkpoint_then_resumes(tmp_path):
    import torch

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["--multirun", "method=peqa", "seed=0,1", *TINY, "train.steps=30", "train.checkpoint_every=2",
            f"results_dir={tmp_path}/r", f"hydra.sweep.dir={tmp_path}/h"]
    proc = subprocess.Popen([sys.executable, "-m", "qexp.run", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not list((tmp_path / "r").rglob("checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: training stops after this step, with a checkpoint
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    (path,) = list((tmp_path / "r").rglob("result.json"))  # the sweep stopped: seed=1 never started
    rec = read(path)
    stop = rec["preempted"]
    assert rec["status"] == "preempted" and rec["error"].startswith("Preempted: stop signal at step"), err[-3000:]
    assert stop["stage"] == "train"
    assert 2 <= stop["step"] < 30 and stop["checkpoint"] == str(path.parent / "checkpoint.pt")
    assert torch.load(stop["checkpoint"], weights_only=False)["step"] == stop["step"]
    assert "[qexp] cell preempted: method=peqa seed=0" in err and "1 of 1 cells preempted" in err
    assert "cells failed" not in err

    again = _cli(*[a for a in args if a not in ("--multirun", "seed=0,1")], f"hydra.run.dir={tmp_path}/h1")
    assert again.returncode == 0, again.stderr[-2000:]
    assert read(path)["status"] == "ok" and read(path)["train"]["resumed_from"] == stop["step"]


def test_analysis_lists_preempted_apart_and_surfaces_collapse(tmp_path, cfg_factory):
    import contextlib
    import io

    from qexp import analysis
    from qexp.analysis.__main__ import main

    ok = run_cell(cfg_factory("method=rtn"))
    collapsed = run_cell(cfg_factory("method=peqa", "train.lr=1e6"))  # PEQA's scales blow up: a uniform model
    assert ok["status"] == collapsed["status"] == "ok" and not ok["warnings"]
    assert any(w.startswith("collapsed: ppl/wikitext_sample/final=") for w in collapsed["warnings"])
    stopped = {**ok, "status": "preempted", "error": "Preempted: stop signal at step 3/30",
               "preempted": {"stage": "eval_base", "step": 3, "checkpoint": "/x/checkpoint.pt"}}
    (tmp_path / "results" / "other" / "cell").mkdir(parents=True)
    (tmp_path / "results" / "other" / "cell" / "result.json").write_text(json.dumps(stopped))
    res = analysis.load(tmp_path / "results")
    assert list(res.preempted["resume"]) == ["step 3 (/x/checkpoint.pt)"]
    assert list(res.warnings["method"].unique()) == ["peqa"]
    assert "1 not ok: 1 preempted, 1 with warnings" in repr(res)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main([str(tmp_path / "results"), "--no-plots", "--out", str(tmp_path / "a")])
    assert "preempted (left out; rerun the sweep to resume them)" in out.getvalue()
    assert "warnings (kept in; the final model is degenerate)" in out.getvalue()


def test_collapse_warnings_name_the_degenerate_signs():
    import math

    from qexp.results import collapse_warnings

    vocab = 1000
    healthy = {"metrics": {"ppl/a/base": 30.0, "ppl/a/final": 25.0}, "train": {"losses": [4.0, 3.5, 3.4, 3.3]}}
    assert collapse_warnings(healthy, vocab) == []
    uniform = {"metrics": {"ppl/a/base": 30.0, "ppl/a/final": 999.9}, "train": {}}
    (w,) = collapse_warnings(uniform, vocab)
    assert "ppl/a/final=999.9" in w and "1000" in w and "at init it was 30" in w
    flat = {"metrics": {"ppl/a/final": 900.0}, "train": {"losses": [3.0, *[math.log(vocab)] * 5]}}
    (w,) = collapse_warnings(flat, vocab)
    assert w.startswith("collapsed: the last 5 training losses") and "the first was 3" in w
    random_model = {"metrics": {"ppl/a/base": 1010.0, "ppl/a/final": 1005.0},  # uniform from the start
                    "train": {"losses": [math.log(vocab)] * 6}}
    assert collapse_warnings(random_model, vocab) == []


def test_a_stop_signal_ends_the_sweep_but_an_ordinary_failure_does_not():
    import pytest
    from hydra.core.utils import JobReturn, JobStatus

    from qexp.callbacks import ReportFailures
    from qexp.train import Preempted

    cb = ReportFailures()
    failed = JobReturn(overrides=["bits=5"], status=JobStatus.FAILED, _return_value=ValueError("bits=5"))
    cb.on_job_end(None, failed)  # goes on to the next cell
    stopped = JobReturn(overrides=["bits=3"], status=JobStatus.FAILED, _return_value=Preempted("stop at step 3"))
    with pytest.raises(SystemExit):
        cb.on_job_end(None, stopped)
    assert len(cb.failed) == 1 and len(cb.preempted) == 1  # listed apart
    import atexit

    atexit.unregister(cb._summary)  # no failure summary printed at the end of the test session


def test_cell_ids_leave_out_what_the_method_does_not_use(cfg_factory):
    from qexp.results import cell_id

    assert cell_id(cfg_factory("method=rtn", "train.steps=10", "train.lr=1")) == cell_id(cfg_factory("method=rtn"))
    assert cell_id(cfg_factory("method=gptq", "train.seqlen=128")) == cell_id(cfg_factory("method=gptq"))
    assert cell_id(cfg_factory("method=peqa", "train.steps=10")) != cell_id(cfg_factory("method=peqa"))
    assert cell_id(cfg_factory("method=peqa", "quant.damp=0.1")) == cell_id(cfg_factory("method=peqa"))  # RTN base
    assert cell_id(cfg_factory("method=gptq", "quant.damp=0.1")) != cell_id(cfg_factory("method=gptq"))
    assert cell_id(cfg_factory("method=qwha", "quant.calib_samples=8")) != cell_id(cfg_factory("method=qwha"))


def test_every_committed_record_keeps_its_id():
    from omegaconf import OmegaConf

    from qexp.config import Config
    from qexp.results import cell_dir

    paths = sorted((ROOT / "results").rglob("result.json"))
    assert len(paths) > 50
    for path in paths:
        rec = json.loads(path.read_text())
        cfg = OmegaConf.merge(OmegaConf.structured(Config), rec["config"])
        # rerunning the config finds this record: under its id, or the id before unused sections left it
        assert path.parent.name in (cell_dir(cfg).name, cell_dir(cfg, legacy=True).name), path


def test_a_record_under_its_old_id_is_still_found(cfg_factory):
    from qexp.results import cell_dir

    cfg = cfg_factory("method=rtn", "train.steps=10")
    first = run_cell(cfg)
    old = cell_dir(cfg, legacy=True)  # the id train.steps gave it before
    assert old != Path(first["dir"])
    Path(first["dir"]).rename(old)
    again = run_cell(cfg)
    assert again["started"] == first["started"] and not Path(first["dir"]).exists()
