"""Cell locks: launches of one sweep share its cells; stale locks are taken over, live ones never."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from qexp.lock import CellLock
from qexp.results import read

from .conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


def _write_lock(path: Path, pid: int, host: str, age_s: float = 0.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "host": host, "token": "theirs"}))
    t = time.time() - age_s
    os.utime(path, (t, t))


def test_one_holder_at_a_time_and_release_frees_the_cell(tmp_path):
    a, b = CellLock(tmp_path / "c" / "lock.json"), CellLock(tmp_path / "c" / "lock.json")
    assert a.acquire()
    held = json.loads((tmp_path / "c" / "lock.json").read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["token"]
    assert not b.acquire()  # a live lock is never taken
    a.release()
    assert not (tmp_path / "c" / "lock.json").exists() and b.acquire()
    b.release()


def test_a_dead_process_lock_is_taken_over(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / "lock.json"
    _write_lock(lock, int(done.stdout), socket.gethostname())  # same host, the pid has exited
    mine = CellLock(lock)
    assert mine.acquire() and json.loads(lock.read_text())["token"] == mine.me["token"]
    mine.release()


def test_a_silent_lock_is_taken_over_after_the_stale_time_and_not_before(tmp_path):
    lock = tmp_path / "lock.json"
    _write_lock(lock, os.getpid(), "another-node", age_s=10)  # its pid cannot be checked from here
    assert not CellLock(lock, stale_s=60).acquire()
    _write_lock(lock, os.getpid(), "another-node", age_s=120)  # no heartbeat for 2 minutes
    mine = CellLock(lock, stale_s=60)
    assert mine.acquire()
    mine.release()


def test_the_heartbeat_keeps_a_long_cell_live(tmp_path):
    lock = tmp_path / "lock.json"
    mine = CellLock(lock, stale_s=0.5, heartbeat_s=0.05)
    assert mine.acquire()
    time.sleep(1.0)  # twice the stale time, heartbeats in between
    assert not CellLock(lock, stale_s=0.5).acquire()
    mine.release()


def test_breaking_a_stale_lock_never_removes_a_fresh_one_made_meanwhile(tmp_path):
    lock = tmp_path / "lock.json"
    _write_lock(lock, os.getpid(), "another-node", age_s=600)
    late = CellLock(lock, stale_s=60)
    seen = late.holder()  # judged stale ...
    first = CellLock(lock, stale_s=60)
    assert first.acquire()  # ... but another launch took it over first
    late._break(seen)
    assert json.loads(lock.read_text())["token"] == first.me["token"]
    assert not late.acquire()
    first.release()


def test_two_launches_of_one_sweep_run_each_cell_exactly_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    sweep = ["--multirun", "method=rtn", "group_size=16,32,64,-1", *TINY, f"results_dir={tmp_path}/r"]
    launches = [subprocess.Popen([sys.executable, "-m", "qexp.run", *sweep, f"hydra.sweep.dir={tmp_path}/h{i}"],
                                 cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in launches]
    assert [p.returncode for p in launches] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    ran = Counter(Path(d).name for out in outs for d in re.findall(r"\] - run (\S+)", out))
    records = {p.parent.name: read(p) for p in (tmp_path / "r").rglob("result.json")}
    assert len(records) == 4 and all(r["status"] == "ok" for r in records.values())
    assert ran == Counter(dict.fromkeys(records, 1)), ran  # each cell computed once, by one of the two
    skipped = sum(out.count("another launch is running it") + out.count("already done") for out in outs)
    assert skipped == 4  # the other launch passed each cell by
    assert not list((tmp_path / "r").rglob("lock.json"))
