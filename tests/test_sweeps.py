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


def test_multirun_with_a_bad_cell_records_it_and_goes_on(tmp_path):
    r = _cli("--multirun", "method=rtn,peqa", "group_size=32,48", *TINY, f"results_dir={tmp_path}",
             f"hydra.sweep.dir={tmp_path}/hydra")
    assert r.returncode != 0  # the sweep reports failure at the end
    recs = [read(p) for p in tmp_path.rglob("result.json")]
    status = sorted((x["config"]["method"]["name"], x["config"]["group_size"], x["status"]) for x in recs)
    assert status == [("peqa", 32, "ok"), ("peqa", 48, "failed"), ("rtn", 32, "ok"), ("rtn", 48, "failed")]
    assert all("group_size=48" in x["error"] for x in recs if x["status"] == "failed")
    assert "2 of 4 cells failed" in r.stderr and "group_size=48" in r.stderr


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
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [*TINY, "method=rtn", "eval.max_windows=50", f"results_dir={tmp_path}", f"hydra.run.dir={tmp_path}/h"]
    proc = subprocess.Popen([sys.executable, "-m", "qexp.run", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not any(read(p).get("status") == "running" for p in tmp_path.rglob("result.json")):
        time.sleep(0.05)
    time.sleep(2)  # inside load / evaluation, before any training
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) != 0
    rec = read(next(tmp_path.rglob("result.json")))
    assert rec["status"] == "failed" and rec["error"].startswith("Interrupted: signal SIGTERM")


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
    assert len(cb.failed) == 2
    import atexit

    atexit.unregister(cb._summary)  # no failure summary printed at the end of the test session
