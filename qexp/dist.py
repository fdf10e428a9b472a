"""Everything qexp knows about ranks: one cell on several processes (data parallel, FSDP).

A cell is launched on several processes by ``torchrun`` / ``accelerate launch`` (they set
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), or as the tasks of one SLURM job step (Hydra's submitit
launcher with ``tasks_per_node`` > 1: :func:`setup` exports the torch variables from SLURM's
through submitit). :func:`setup` then starts accelerate's process group: NCCL on GPUs, gloo
on CPUs (two CPU processes are a real, testable data-parallel run).

Who does what:
  every rank      loads the model, quantizes the base (the main process first, so a GPTQ base
                  is computed once and read from the cache by the others), then takes the main
                  process's attached model (:func:`broadcast_module`: one base, one calibrated
                  init), and trains its shard of each batch (``qexp.train``)
  main process    evaluates, writes the checkpoint, the record and the W&B run, exports
                  (:func:`main_only`); the other ranks skip those steps

An FSDP launch (``distributed_type: FSDP``, which sets ``ACCELERATE_USE_FSDP``) shards the model with
torch's FSDP2 in the trainer (:func:`shard`) instead of replicating it; after training the main
process gathers it whole (:func:`unshard`) for merge, evaluation and export.

``train.batch_size`` is the micro-batch of the whole cell: each of ``W`` ranks takes
``batch_size / W`` of its rows, so the global batch is ``batch_size × grad_accum`` whatever ``W``
is, and a cell gives the same losses (within float rounding) on one process or several.
"""

from __future__ import annotations

import atexit
import copy
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import wraps
from typing import Any, TypeVar

import torch
from accelerate import PartialState
from omegaconf import DictConfig
from torch import nn

from .config import ConfigError

# How long a rank waits in a collective: the others wait while the main process evaluates alone.
TIMEOUT = timedelta(hours=4)
T = TypeVar("T")
_FSDP = False  # set by setup(): the launch asked for FSDP


def slurm_tasks() -> int:
    """Tasks in this SLURM job step (``srun``, as submitit starts them); 1 outside SLURM."""
    return int(os.environ.get("SLURM_STEP_NUM_TASKS", 1))


def setup(cfg: DictConfig) -> PartialState:
    """Check the launch and start the process group (once per process); before any work.

    Raises :class:`ConfigError` for more processes than GPUs, a micro-batch that does not
    split evenly across the processes, and ``--multirun`` inside a multi-process launcher."""
    from_slurm = "RANK" not in os.environ and slurm_tasks() > 1
    if from_slurm:  # the tasks of a submitit job: MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK from SLURM's
        from submitit.helpers import TorchDistributedEnvironment

        os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")  # set in submitit's jobs; a plain `srun` step too
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)  # keeps MASTER_PORT
    check(cfg, int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or None,
          multirun=_hydra_multirun() and not (from_slurm or _slurm_launcher()))
    global _FSDP
    if "ACCELERATE_USE_FSDP" in os.environ:  # an FSDP launch: qexp shards with FSDP2 itself (CPU too), not accelerate
        _FSDP = os.environ.pop("ACCELERATE_USE_FSDP").lower() == "true"
    _stop_with_launcher()
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=TIMEOUT)
    if torch.distributed.is_initialized():
        atexit.register(_teardown)
    return state


def _teardown() -> None:
    """End the process group before the interpreter does (gloo's threads otherwise may abort the exit)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _stop_with_launcher() -> None:
    """torchrun (and ``accelerate launch``) start each worker in its own session: if the launcher is
    SIGKILLed the workers would train on alone and race the rerun. Linux sends them SIGTERM when it
    dies instead, which stops them like a preemption (checkpoint, then exit)."""
    if sys.platform != "linux" or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the launcher died before that
        os.kill(os.getpid(), signal.SIGTERM)


def check(cfg: DictConfig, world: int, local_world: int | None = None, multirun: bool = False,
          gpus: int | None = None) -> None:
    """The launch checks of :func:`setup` (``gpus``: visible CUDA devices, None: ask torch)."""
    if world <= 1:
        return
    if multirun:
        raise ConfigError(
            f"--multirun under a multi-process launcher (WORLD_SIZE={world}) is not supported: every process "
            "would run the whole sweep. Launch the sweep through the SLURM launcher instead, one job per cell "
            "on several GPUs: python -m qexp.run --multirun hydra/launcher=slurm_ddp hydra.launcher.gpus_per_node=N")
    gpus = (torch.cuda.device_count() if torch.cuda.is_available() else 0) if gpus is None else gpus
    local = local_world or world
    if gpus and local > gpus:
        raise ConfigError(f"{local} processes on this node but only {gpus} visible GPU(s) "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                          f"launch at most {gpus} processes per node (--nproc_per_node / num_processes)")
    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} (the cell's micro-batch) does not split evenly "
                          f"across {world} processes; use a multiple of {world} (each process takes batch_size/{world} "
                          f"rows; global batch = batch_size x train.grad_accum={cfg.train.grad_accum})")


def _hydra_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _slurm_launcher() -> bool:
    """This Hydra job was started by the submitit launcher (inside a SLURM job, not a torchrun)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and "submitit" in str(HydraConfig.get().launcher.get("_target_", ""))


def world() -> int:
    return PartialState().num_processes


def device() -> torch.device:
    """This process's device: its GPU (``cuda:LOCAL_RANK``) if any, else the CPU."""
    return PartialState().device


def is_main() -> bool:
    return PartialState().is_main_process


def main_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """``fn`` run by the main process only (the others get None): evaluation, export, files."""
    @wraps(fn)
    def run(*args: Any, **kwargs: Any) -> T | None:
        return fn(*args, **kwargs) if is_main() else None
    return run


@contextmanager
def main_first() -> Iterator[None]:
    """The main process runs the block first (filling a cache), then the others (reading it)."""
    with PartialState().main_process_first():
        yield


@torch.no_grad()
def broadcast_module(model: nn.Module) -> None:
    """Every parameter and buffer (integer codes and scales too) takes the main process's value."""
    if world() == 1:
        return
    for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values():
        src = t.data if t.data.is_contiguous() else t.data.contiguous()
        torch.distributed.broadcast(src, src=0)
        if src is not t.data:
            t.data.copy_(src)


def gather(obj: T) -> list[T]:
    """``obj`` from every rank, in rank order, on every rank."""
    if world() == 1:
        return [obj]
    out: list = [None] * world()
    torch.distributed.all_gather_object(out, obj)
    return out


def mean(x: float) -> float:
    """The mean of ``x`` over the ranks."""
    if world() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=PartialState().device)
    torch.distributed.all_reduce(t)
    return t.item() / world()


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on one (a stop signal that reached one rank stops all)."""
    return mean(float(flag)) > 0


# FSDP (torch FSDP2 ``fully_shard``): the trainer shards after attach and gives the main process a
# full model back for merge, evaluation and export.


def sharded() -> bool:
    """Training shards the model (an FSDP launch on more than one process)."""
    return _FSDP and world() > 1


def shard(model: nn.Module) -> nn.Module:
    """Shard ``model`` in place with FSDP2 (each decoder block, then the root: parameters are split
    across ranks, buffers such as integer codes and scales stay whole) and return an empty copy of
    it on the meta device, for :func:`unshard`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    memo = {i: (nn.Parameter(t.to("meta"), t.requires_grad) if isinstance(t, nn.Parameter) else t.to("meta"))
            for i, t in tensors.items()}
    skeleton = copy.deepcopy(model, memo)  # the structure (method layers too), no storage
    mesh = init_device_mesh(device().type, (world(),))
    for p in model.parameters():  # FSDP2 shards contiguous parameters only (CLoQ's B comes from an SVD transpose)
        if not p.is_contiguous():
            p.data = p.data.contiguous()
    blocks = set(getattr(model, "_no_split_modules", None) or [])  # HF's decoder block class names
    for m in list(model.modules()):
        if type(m).__name__ in blocks:
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return skeleton


def unshard(model: nn.Module, skeleton: nn.Module) -> nn.Module:
    """The sharded ``model`` gathered into ``skeleton`` on the main process (on its device); the
    other ranks get the empty skeleton (they merge, evaluate and export nothing)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main():
        return skeleton
    skeleton.load_state_dict(full, assign=True)
    for name, buf in model.named_buffers():  # non-persistent buffers (RoPE) are in no state dict
        mod, _, leaf = name.rpartition(".")
        owner = skeleton.get_submodule(mod)
        if owner._buffers[leaf].is_meta:
            owner._buffers[leaf] = buf
    return skeleton.to(device())


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Trainable parameters and optimizer state of a sharded model, whole (on the main process)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=True))


def load_full_state(model: nn.Module, opt: torch.optim.Optimizer, params: dict, optim: dict) -> None:
    """Put :func:`full_state`'s result back into the sharded ``model`` and ``opt`` (every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, opt, model_state_dict=params, optim_state_dict=optim,
                   options=StateDictOptions(full_state_dict=True, strict=False))
