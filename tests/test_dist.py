"""One cell on two processes (gloo DDP on the CPU): sharded data, one checkpoint, one record, resume.

The commands here are the README's ("### One large model on several GPUs")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from qexp import dist
from qexp.config import ConfigError
from qexp.data import batches
from qexp.results import read
from qexp.run import run_cell

from .conftest import CONF, TINY, make_cfg

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# A cell whose global micro-batch (4) splits into 2 ranks x 2 rows; a checkpoint every 2 steps.
CELL = [*TINY, "method=peqa", "train.steps=24", "train.batch_size=4", "train.checkpoint_every=2",
        "train.log_every=1", "eval.base=false"]
ACCELERATE = [str(BIN / "accelerate"), "launch", "--config_file", "conf/accelerate/ddp_cpu2.yaml", "-m", "qexp.run"]
FSDP = [str(BIN / "accelerate"), "launch", "--config_file", "conf/accelerate/fsdp_cpu2.yaml", "-m", "qexp.run"]
TORCHRUN = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "qexp.run"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def _launch(cmd: list[str], *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*cmd, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _records(root: Path) -> list[dict]:
    return [read(p) for p in root.rglob("result.json")]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    """The reference: the same cell on one process (micro-batch 4)."""
    return run_cell(make_cfg(*CELL, results_dir=tmp_path_factory.mktemp("one")))


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The same cell, uninterrupted, on two CPU processes through accelerate, with a W&B run."""
    out = tmp_path_factory.mktemp("two")
    r = _launch(ACCELERATE, *CELL, "tracking=wandb_offline", f"results_dir={out}", f"hydra.run.dir={out}/h")
    return out, r


def test_batches_shards_are_disjoint_and_make_up_the_batch():
    chunks = torch.arange(40).view(20, 2)
    whole = batches(chunks, 4, seed=0)
    shards = [batches(chunks, 4, seed=0, shard=(r, 2)) for r in range(2)]
    for _ in range(12):  # over two epochs
        rows = [next(s)["input_ids"] for s in shards]
        assert [len(x) for x in rows] == [2, 2]
        assert torch.equal(torch.cat(rows), next(whole)["input_ids"])
    with pytest.raises(ValueError, match="batch_size=3 does not split into 2"):
        next(batches(chunks, 3, seed=0, shard=(0, 2)))


def test_launch_checks_name_the_numbers():
    cfg = OmegaConf.create({"train": {"batch_size": 6, "grad_accum": 2}})
    dist.check(cfg, world=1, multirun=True)  # one process: anything goes
    dist.check(cfg, world=2, gpus=0)  # CPU processes (gloo)
    with pytest.raises(ConfigError, match=r"4 processes on this node but only 2 visible GPU\(s\)"):
        dist.check(cfg, world=4, local_world=4, gpus=2)
    with pytest.raises(ConfigError, match=r"train.batch_size=6 .* across 4 processes; use a multiple of 4"):
        dist.check(cfg, world=4, gpus=0)
    with pytest.raises(ConfigError, match="--multirun under a multi-process launcher.*SLURM launcher"):
        dist.check(cfg, world=2, multirun=True)


def test_a_rank_other_than_the_main_writes_evaluates_and_tracks_nothing(tmp_path, monkeypatch):
    """What keeps a second process from writing a second record, checkpoint, W&B run or evaluation."""
    import qexp.run

    monkeypatch.setattr(dist, "is_main", lambda: False)
    monkeypatch.setattr(qexp.run, "perplexity", lambda *a, **k: pytest.fail("a non-main rank evaluated"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    rec = run_cell(make_cfg(*CELL, "train.steps=4", "tracking=wandb_offline", "export=fp16",
                            results_dir=tmp_path))
    assert rec["train"]["steps"] == 4 and rec["metrics"] == {}
    assert not list(tmp_path.rglob("*")), "a non-main rank wrote files"  # no record, checkpoint, W&B run, export


def test_two_processes_shard_the_batch_and_match_one_process(one_process, two_processes):
    out, r = two_processes
    assert r.returncode == 0, r.stderr[-3000:]
    recs = _records(out)
    assert [x["status"] for x in recs] == ["ok"]  # one record
    rec = recs[0]
    t = rec["train"]
    assert (t["world_size"], t["micro_batch_per_rank"], t["grad_accum"], t["global_batch"]) == (2, 2, 1, 4)
    assert t["losses"] == pytest.approx(one_process["train"]["losses"], rel=1e-5) and not t["fsdp"]
    assert rec["metrics"] == pytest.approx(one_process["metrics"], rel=1e-5)
    assert rec["cell_id"] == one_process["cell_id"]  # the process count is not part of the experiment
    assert len(list(out.rglob("run-*.wandb"))) == 1  # one W&B run
    assert not list(out.rglob("checkpoint.pt*"))
    assert r.stdout.count("status=ok") == 1  # the summary is printed once


def _kill_and_resume(cmd: list[str], out: Path) -> dict:
    """Start the cell, SIGKILL the launcher after the first checkpoint, rerun: the one record."""
    args = [*CELL, "tracking=disabled", f"results_dir={out}", f"hydra.run.dir={out}/h"]
    proc = subprocess.Popen([*cmd, *args], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list(out.rglob("checkpoint.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    while time.time() < deadline and [x["status"] for x in _records(out)] == ["running"]:
        time.sleep(0.1)  # the workers checkpoint and exit
    killed_at = torch.load(next(out.rglob("checkpoint.pt")), weights_only=False)["step"]
    assert 0 < killed_at < 24
    rec = _records(out)
    assert [x["status"] for x in rec] == ["preempted"] and rec[0]["error"].startswith("Preempted: stop signal")
    assert rec[0]["preempted"]["step"] == killed_at and rec[0]["preempted"]["stage"] == "train"

    r = _launch(cmd, *args)  # the same command again
    assert r.returncode == 0, r.stderr[-3000:]
    recs = _records(out)
    assert [x["status"] for x in recs] == ["ok"]
    assert recs[0]["train"]["resumed_from"] >= killed_at and recs[0]["train"]["world_size"] == 2
    assert not list(out.rglob("checkpoint.pt*"))
    return recs[0]


def test_two_processes_killed_mid_training_resume_to_the_uninterrupted_result(tmp_path, one_process, two_processes):
    """SIGKILL to the launcher: its workers (in their own sessions) stop as if preempted (checkpoint,
    ``preempted``) instead of training on alone; the same command resumes to the uninterrupted
    two-process result. (Launcher and workers killed at once, a lost node, resume from the last periodic
    checkpoint, as one process does: test_sweeps.)"""
    rec = _kill_and_resume(TORCHRUN, tmp_path)
    uninterrupted = _records(two_processes[0])[0]
    assert rec["train"]["losses"] == pytest.approx(uninterrupted["train"]["losses"], rel=1e-6)
    assert rec["metrics"] == pytest.approx(uninterrupted["metrics"], rel=1e-6)
    assert rec["train"]["losses"] == pytest.approx(one_process["train"]["losses"], rel=1e-5)


def test_fsdp_on_two_processes_shards_resumes_and_merges_a_full_model(tmp_path, one_process):
    """FSDP2 on gloo: sharded training, a full checkpoint from sharded state and back after the kill,
    then merge and evaluation on the gathered model; the one-process losses and metrics."""
    rec = _kill_and_resume(FSDP, tmp_path)
    assert rec["train"]["fsdp"] and rec["train"]["micro_batch_per_rank"] == 2
    assert rec["train"]["losses"] == pytest.approx(one_process["train"]["losses"], rel=1e-5)
    assert rec["metrics"] == pytest.approx(one_process["metrics"], rel=1e-5)
    assert rec["merge"]["lossless"] and rec["merge"]["merged_layers"] == one_process["merge"]["merged_layers"]


def test_multirun_under_torchrun_is_refused(tmp_path):
    r = _launch(TORCHRUN, "--multirun", *TINY, "method=rtn,peqa", f"results_dir={tmp_path}",
                f"hydra.sweep.dir={tmp_path}/h")
    assert r.returncode != 0
    assert "--multirun under a multi-process launcher (WORLD_SIZE=2) is not supported" in r.stderr
    assert not list(tmp_path.rglob("result.json"))


PROBE = """
import json, sys
from omegaconf import OmegaConf
from qexp import dist
state = dist.setup(OmegaConf.create({"train": {"batch_size": 2, "grad_accum": 1}}))
ranks = dist.gather(state.process_index)
print(json.dumps({"rank": state.process_index, "ranks": ranks, "type": str(state.distributed_type)}))
"""


def test_the_tasks_of_a_slurm_job_step_join_one_process_group():
    """What submitit's srun gives each task (``slurm_ddp``): qexp turns it into one process group."""
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "1",
             "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "localhost", "MASTER_PORT": str(_free_port())}
    env = {k: v for k, v in _env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    procs = [subprocess.Popen([sys.executable, "-c", PROBE], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env={**env, **slurm, "SLURM_PROCID": f"{i}",
                                                                     "SLURM_LOCALID": f"{i}"})
             for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    got = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    assert got == [{"rank": i, "ranks": [0, 1], "type": "DistributedType.MULTI_CPU"} for i in range(2)]


ATTACH = """
import json, sys
from pathlib import Path
import torch
from qexp import adapt, dist, models
from qexp.config import method_config
from qexp.methods import get
from qexp.quant import QuantSpec, gptq
from tests.conftest import make_cfg, tiny_llama

cfg = make_cfg("method=lota", "quant.init=gptq")
rank = dist.setup(cfg).process_index
runs = []
compute = gptq.gptq_results
gptq.gptq_results = lambda *a, **k: runs.append(rank) or compute(*a, **k)
model = tiny_llama()
calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
torch.manual_seed(rank)  # LoTA's random adapter init differs per rank, unless the main process's is taken
method = get("lota")(method_config(cfg), QuantSpec(cfg.bits, 32, False))
adapt.attach(model, method, models.targets(model, list(cfg.model.targets)), cfg.quant, lambda: calib, Path(sys.argv[1]))
state = [float(t.double().sum()) for t in model.state_dict().values()]
print(json.dumps({"gptq_runs": dist.gather(len(runs)), "same": dist.gather(state)[0] == dist.gather(state)[1]}))
"""


def test_the_base_and_init_are_made_once_and_shared(tmp_path):
    """GPTQ runs on the main process only (the other rank reads its cache); every rank ends with the
    main process's attached model, although its own random init differed."""
    port = str(_free_port())
    env = {**_env(), "MASTER_ADDR": "localhost", "MASTER_PORT": port, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", ATTACH, str(tmp_path)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**env, "RANK": f"{i}", "LOCAL_RANK": f"{i}"}) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    got = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    assert got[0] == got[1] == {"gptq_runs": [1, 0], "same": True}


def test_the_slurm_ddp_launcher_runs_one_task_per_gpu():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm_ddp", "hydra.launcher.gpus_per_node=8",
                                                       "hydra.launcher.nodes=2"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert "SlurmLauncher" in launcher._target_
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 8, 8)
    assert launcher.max_num_timeout > 0  # requeued on preemption, resumes from the checkpoint


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]
