"""Cell locks: several launches of one sweep into one ``results_dir`` split its cells, no scheduler.

A launch that runs a cell holds ``<cell dir>/lock.json``, created atomically (``O_CREAT | O_EXCL``,
so of two launches exactly one creates it), holding its pid, host, start time and a random token.
While the cell runs, a thread touches the file every :data:`HEARTBEAT_S` seconds (its mtime is the
heartbeat). Another launch skips a cell whose lock is live and takes the next one.

A lock is stale when its process is gone (same host, dead pid) or its heartbeat is older than
:data:`STALE_S` (any host: a killed node, a frozen job). Taking a stale lock over is guarded by a
second file, ``lock.json.break`` (also ``O_EXCL``): only its holder may delete the lock, and only
if the lock still carries the token it judged stale, so a fresh lock that another launch made in
between is never removed. Then the usual atomic create decides who gets the cell.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("qexp")
HEARTBEAT_S = 30.0
STALE_S = 300.0  # 10 missed heartbeats


class CellLock:
    """``acquire()`` → True if this process now holds ``path`` (heartbeat running); ``release()``."""

    def __init__(self, path: Path, stale_s: float = STALE_S, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.path, self.stale_s, self.heartbeat_s = Path(path), stale_s, heartbeat_s
        self.me = {"pid": os.getpid(), "host": socket.gethostname(), "token": uuid.uuid4().hex,
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "heartbeat_s": heartbeat_s}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self._thread = threading.Thread(target=self._beat, name=f"qexp-lock-{self.path.parent.name}",
                                                daemon=True)
                self._thread.start()
                return True
            seen = self.holder()
            if not self.stale(seen):
                return False
            log.warning("taking over the stale lock %s (%s)", self.path, seen)
            self._break(seen)
        return False

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self.holder().get("token") == self.me["token"]:
                self.path.unlink(missing_ok=True)

    def holder(self) -> dict[str, Any]:
        """The lock's content (``{}`` if there is none, or it is still being written), with its age."""
        try:
            age = time.time() - self.path.stat().st_mtime
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return {**info, "heartbeat_age_s": round(age, 1)} if isinstance(info, dict) else {}

    def stale(self, info: dict[str, Any]) -> bool:
        if not info:  # no lock, or one just created and not yet written: not stale
            return False
        if info.get("heartbeat_age_s", 0) > self.stale_s:
            return True
        return info.get("host") == self.me["host"] and not _alive(int(info.get("pid", -1)))

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.me, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _break(self, seen: dict[str, Any]) -> None:
        guard = self.path.with_name(self.path.name + ".break")
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            try:
                if time.time() - guard.stat().st_mtime > 60:  # a breaker died within these few lines
                    guard.unlink(missing_ok=True)
            except OSError:
                pass
            return
        try:
            now = self.holder()
            if now.get("token") == seen.get("token") and self.stale(now):
                self.path.unlink(missing_ok=True)
        finally:
            guard.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if self.holder().get("token") != self.me["token"]:
                log.warning("lock %s was taken over by %s; this launch goes on with the cell", self.path,
                            self.holder())
                return
            try:
                os.utime(self.path)
            except OSError:
                return


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
