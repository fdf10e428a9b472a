"""Hydra callback for ``--multirun``: check every cell before the first one runs; name every failed,
preempted and collapsed cell (Hydra itself re-raises only the first failure); stop the sweep when a
cell was stopped by a signal (SIGTERM/SIGUSR1/Ctrl-C: preemption, ``kill``)."""

from __future__ import annotations

import atexit
import sys
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .results import STOPS

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


class ReportFailures(Callback):
    """Checks the sweep at its start, prints each failed or preempted cell when it ends, and a
    summary when the sweep process exits."""

    def __init__(self) -> None:
        self.failed: list[str] = []
        self.preempted: list[str] = []
        self.collapsed: list[str] = []
        self.total = 0
        self.running: list[str] | None = None  # the overrides of the cell that has started and not ended
        atexit.register(self._summary)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Compose and check every cell (:func:`qexp.preflight.check_sweep`); refuse the sweep if one
        is bad, unless ``skip_invalid=true``."""
        if config.hydra.sweeper.get("_target_") != BASIC_SWEEPER:
            return  # another sweeper chooses its cells as it goes: each is checked when it starts
        from .preflight import check_sweep, describe

        bad, total = check_sweep(config)
        if bad:
            print(describe(bad, total, bool(config.get("skip_invalid"))), file=sys.stderr)
            if not config.get("skip_invalid"):
                atexit.unregister(self._summary)
                raise SystemExit(2)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.running = list(config.hydra.overrides.task) if "hydra" in config else []

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        self.total += 1
        self.running = None
        line = " ".join(job_return.overrides or [])
        if job_return.status == JobStatus.FAILED:
            err = job_return._return_value
            stop = type(err).__name__ in STOPS
            (self.preempted if stop else self.failed).append(f"{line}: {type(err).__name__}: {err}")
            print(f"[qexp] cell {'preempted' if stop else 'failed'}: {line}: {type(err).__name__}: {err}",
                  file=sys.stderr)
            if stop:  # a stop signal ends the sweep, not just this cell
                print("[qexp] stop signal: sweep stopped; rerun the same command to resume", file=sys.stderr)
                raise SystemExit(143)
        elif isinstance(job_return._return_value, dict):
            warnings = job_return._return_value.get("warnings") or []
            self.collapsed += [f"{line}: {w}" for w in warnings]

    def _summary(self) -> None:
        if self.running is not None:  # Ctrl-C outside training: the cell never ended
            self.preempted.append(f"{' '.join(self.running)}: interrupted")
        parts = [(self.failed, "failed (records say status=failed; a config error writes no record)"),
                 (self.preempted, "preempted (records say status=preempted; rerun the same command to resume)"),
                 (self.collapsed, "ok but degenerate (records carry warnings)")]
        if self.total > 1 or self.preempted or self.collapsed:
            for cells, what in parts:
                if cells:
                    print(f"[qexp] {len(cells)} of {max(self.total, len(cells))} cells {what}:",
                          *(f"  - {c}" for c in cells), sep="\n", file=sys.stderr)
