"""Clocks, memory meters and the machine description the benchmark records.

Memory, CPU: the resident set size from ``/proc/self/status``. ``VmHWM`` (the peak RSS) is reset
by writing ``5`` to ``/proc/self/clear_refs`` (Linux ≥ 4.0), so a peak can be taken over one
window (the training steps) instead of the whole process life, which is what ``ru_maxrss``
gives. The workers run with a fixed glibc mmap threshold (``MALLOC_MMAP_THRESHOLD_``), so every
large tensor is its own mapping and freeing it returns the pages to the OS: RSS then follows
the live tensors. Memory, CUDA: ``torch.cuda.memory_allocated`` / ``max_memory_allocated``.
Memory without an allocator (``qexp.plan``): :class:`TensorMemory` counts live tensor storages,
the quantity ``max_memory_allocated`` reports, on any device.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MB = 2**20
# Environment for worker processes: one mapping per tensor ≥ 128 KiB (fixed, not glibc's sliding
# threshold), so freed tensors leave the RSS at once and RSS deltas are tensor bytes.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def clock(dev: torch.device) -> float:
    """``perf_counter`` after the device has finished its queued work."""
    sync(dev)
    return time.perf_counter()


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024 / MB
    raise RuntimeError(f"/proc/self/status has no {key} (the CPU memory meter needs Linux)")


class Memory:
    """The memory in use now and its peak since :meth:`reset_peak` (MB), on ``dev``."""

    def __init__(self, dev: torch.device) -> None:
        self.dev = dev
        self.kind = "cuda max_memory_allocated" if dev.type == "cuda" else "cpu peak RSS (VmHWM)"

    def now(self) -> float:
        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            return torch.cuda.memory_allocated(self.dev) / MB
        return _status("VmRSS")

    def reset_peak(self) -> None:
        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            torch.cuda.reset_peak_memory_stats(self.dev)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS

    def peak(self) -> float:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            return torch.cuda.max_memory_allocated(self.dev) / MB
        return _status("VmHWM")


def tensor_mb(module: nn.Module) -> float:
    """Bytes of the module's parameters and buffers (shared storages once), in MB."""
    seen: dict[int, int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values()) / MB


def materialize(module: nn.Module) -> None:
    """Copy lazily memory-mapped checkpoint tensors into ordinary memory (as on a GPU), so the
    RSS counts the whole model and a later free really gives it back."""
    with torch.no_grad():
        for p in module.parameters():
            p.data = p.data.clone()
        for mod in module.modules():
            for name, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[name] = b.clone()
    gc.collect()


@contextmanager
def no_gc():
    """Python's cyclic GC off inside a timed region (it would fire at random points)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def timed(fn: Callable[[], object], dev: torch.device) -> float:
    t0 = clock(dev)
    fn()
    return clock(dev) - t0


def machine(dev: torch.device) -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    with_model = Path("/proc/cpuinfo")
    if with_model.exists():
        for line in with_model.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(dev),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    return info


class TensorMemory(TorchDispatchMode):
    """Live bytes of tensor storages on ``device`` (None: every device) and their peak, counted
    per storage as CUDA's caching allocator's ``memory_allocated`` counts them, on the CPU too and
    without an allocator: every storage an op creates while the mode is active is added, and
    removed when it is freed. Same interface as :class:`Memory` (MB)."""

    kind = "live tensor storage bytes (dispatch-mode tracker)"

    def __init__(self, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.device = None if device is None else torch.device(device).type
        self.live: dict[int, int] = {}
        self.bytes = self.peak_bytes = 0
        self.timeline: list[int] | None = None  # a list: live bytes after every op (qexp.plan's traces)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
                  and t.device.type != "meta"}  # views and in-place results allocate nothing
        for t in tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and t.device.type != "meta" and self.device in (None, t.device.type)
                    and t.untyped_storage()._cdata not in inputs):
                self._add(t.untyped_storage())
        if self.timeline is not None:
            self.timeline.append(self.bytes)
        return out

    def adopt(self, module: nn.Module) -> nn.Module:
        """Count ``module``'s parameters and buffers as live, as if it had been created inside the
        mode (a model built outside the meter, so that its initialisation's temporaries are not)."""
        for t in [*module.parameters(), *module.buffers()]:
            if self.device in (None, t.device.type):
                self._add(t.untyped_storage())
        return module

    def _add(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key not in self.live:
            self.live[key] = storage.nbytes()
            self.bytes += self.live[key]
            self.peak_bytes = max(self.peak_bytes, self.bytes)
            weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.bytes -= self.live.pop(key, 0)

    def now(self) -> float:
        gc.collect()
        return self.bytes / MB

    def reset_peak(self) -> None:
        gc.collect()
        self.peak_bytes = self.bytes

    def peak(self) -> float:
        return self.peak_bytes / MB
