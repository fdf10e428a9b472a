"""Weights & Biases: one run per cell, offline by default (no login), grouped by sweep."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from . import dist


class Tracker:
    """Thin handle: ``log(metrics, step)`` and ``summary(metrics)``; a no-op when disabled."""

    def __init__(self, run: Any = None) -> None:
        self.run = run

    @property
    def id(self) -> str | None:
        return self.run.id if self.run else None

    def log(self, metrics: dict, step: int | None = None) -> None:
        if self.run:
            self.run.log(metrics, step=step)

    def summary(self, metrics: dict) -> None:
        if self.run:
            self.run.summary.update(metrics)


@contextmanager
def wandb_run(cfg: DictConfig, run_id: str, run_dir: Path, run_name: str) -> Iterator[Tracker]:
    """A W&B run for one cell, always finished (exit code 1 if the cell raised)."""
    if cfg.tracking.mode == "disabled" or not dist.is_main():
        yield Tracker()
        return
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    run_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=cfg.tracking.project, entity=cfg.tracking.entity, mode=cfg.tracking.mode,
        group=cfg.name, job_type=cfg.method.name, name=run_name, id=run_id, resume="allow",
        tags=[f"bits={cfg.bits}", f"group_size={cfg.group_size}", f"model={cfg.model.name}", *cfg.tracking.tags],
        config=OmegaConf.to_container(cfg, resolve=True), dir=str(run_dir), reinit="finish_previous",
    )
    try:
        yield Tracker(run)
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
