"""Hydra callback: name every failed cell of a sweep (Hydra itself re-raises only the first), and
stop the sweep when a cell was stopped by a signal (SIGTERM/SIGUSR1: preemption, ``kill``)."""

from __future__ import annotations

import atexit
import sys
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

STOPS = ("Preempted", "Interrupted")  # qexp.train.Preempted, qexp.results.Interrupted


class ReportFailures(Callback):
    """Prints each failed cell when it ends, and a summary when the sweep process exits."""

    def __init__(self) -> None:
        self.failed: list[str] = []
        self.total = 0
        atexit.register(self._summary)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        self.total += 1
        if job_return.status == JobStatus.FAILED:
            err = job_return._return_value
            line = f"{' '.join(job_return.overrides or [])}: {type(err).__name__}: {err}"
            self.failed.append(line)
            print(f"[qexp] cell failed: {line}", file=sys.stderr)
            if type(err).__name__ in STOPS:  # a stop signal ends the sweep, not just this cell
                print("[qexp] stop signal: sweep stopped; rerun the same command to resume", file=sys.stderr)
                raise SystemExit(143)

    def _summary(self) -> None:
        if self.failed and self.total > 1:
            print(f"[qexp] {len(self.failed)} of {self.total} cells failed (records say status=failed):",
                  *(f"  - {f}" for f in self.failed), sep="\n", file=sys.stderr)
