"""The training loop, on accelerate (device placement, gradient accumulation, DDP/FSDP).

Why accelerate and not the HF Trainer: methods bring their own optimizers (t-SignSGD has no
learning rate) and their own parameter groups, and the loop stays short enough to read in one
sitting; accelerate still gives multi-GPU launch (``accelerate launch``) without code changes.

Resumable: every ``checkpoint_every`` steps, and when SIGTERM/SIGUSR1 arrives (preemption),
the trainable tensors, optimizer, scheduler, RNG, step and losses go to ``ckpt`` atomically.
A rerun continues from there and ends with the losses an uninterrupted run would have had.

Several processes (``qexp.dist``): DDP through accelerate, or FSDP2 (``fully_shard``) for an FSDP
launch. Each rank trains on its ``batch_size / world`` rows of every batch, so the global batch
stays ``batch_size × grad_accum`` and the losses (the mean over ranks) are those of one process.
The main process writes the checkpoint (with every rank's RNG state); a stop signal seen by one
rank stops all at the same step.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from . import dist
from .config import TrainConfig
from .data import batches
from .methods import Method


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss."""


class Preempted(RuntimeError):
    """A stop signal arrived; the checkpoint is saved and a rerun resumes from it."""

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step  # optimizer steps done


def train(model: nn.Module, method: Method, chunks: Tensor, cfg: TrainConfig, seed: int,
          ckpt: Path | None = None, log: Callable[[dict, int], None] = lambda m, s: None) -> dict:
    """Run ``cfg.steps`` optimizer steps; returns ``{"model", "losses", "train_s", "steps", "resumed_from"}``
    and the batch layout (``world_size``, ``micro_batch_per_rank``, ``grad_accum``, ``global_batch``).

    ``model`` is the trained model: the one passed in, or after FSDP a full copy on the main process
    (an empty one on the others)."""
    acc = Accelerator(gradient_accumulation_steps=cfg.grad_accum)
    shard = (acc.process_index, acc.num_processes)
    skeleton = dist.shard(model) if dist.sharded() else None  # FSDP2; else DDP (acc.prepare) or one process
    opt = method.optimizer(model, cfg.lr, cfg.weight_decay, cfg.steps)
    sched = get_scheduler(cfg.scheduler, opt, num_warmup_steps=int(cfg.warmup_ratio * cfg.steps),
                          num_training_steps=cfg.steps)
    start, losses = _restore(ckpt, model, opt, sched, shard[0], sharded=skeleton is not None)
    if skeleton is None:
        model, opt, sched = acc.prepare(model, opt, sched)
    else:
        opt, sched = acc.prepare(opt, sched)
    params = [p for g in opt.param_groups for p in g["params"]]
    data: Iterator[dict] = batches(chunks, cfg.batch_size, seed, start=start * cfg.grad_accum, shard=shard)
    model.train()
    rows = None
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), desc=f"train {method.name}", initial=start, total=cfg.steps,
               disable=not acc.is_local_main_process)
    with _stop_signals() as stop, _activation_checkpointing(acc.unwrap_model(model), cfg.gradient_checkpointing):
        for step in bar:
            total = 0.0
            for _ in range(cfg.grad_accum):
                batch = {k: v.to(acc.device) for k, v in next(data).items()}
                rows = len(batch["input_ids"])  # this rank's share of the micro-batch
                with acc.accumulate(model):
                    loss = model(**batch, use_cache=False).loss  # no KV cache: it would hold every layer's K/V
                    value = loss.item()  # one device sync per micro-batch
                    if not math.isfinite(dist.mean(value)):  # on every rank, if on one
                        raise NonFiniteLoss(f"loss is {value} at step {step}")
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.max_grad_norm:
                        acc.clip_grad_norm_(params, cfg.max_grad_norm)
                    opt.step()
                    sched.step()
                    opt.zero_grad()
                total += value / cfg.grad_accum
            total = dist.mean(total)  # the global batch's loss
            losses.append(total)
            bar.set_postfix(loss=f"{total:.4f}")
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                log({"train/loss": total, "train/lr": sched.get_last_lr()[0]}, step + 1)
            due = cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0
            stopping = dist.any_rank(stop.is_set())
            if ckpt and ((due and step + 1 < cfg.steps) or stopping):  # a stop at the last step too
                state = _state(acc.unwrap_model(model), opt, sharded=skeleton is not None)  # every rank
                dist.main_only(_save)(ckpt, state, sched, step + 1, losses)
                acc.wait_for_everyone()
            if stopping:
                raise Preempted(f"stop signal at step {step + 1}/{cfg.steps}; rerun the same command to resume",
                                step + 1)
    model = dist.unshard(model, skeleton) if skeleton is not None else acc.unwrap_model(model)
    model.eval()
    acc.free_memory()
    return {"model": model, "losses": losses, "train_s": time.perf_counter() - t0, "steps": cfg.steps,
            "resumed_from": start, "world_size": shard[1], "fsdp": skeleton is not None,
            "micro_batch_per_rank": rows, "grad_accum": cfg.grad_accum, "global_batch": cfg.batch_size * cfg.grad_accum}


def _state(model: nn.Module, opt, sharded: bool) -> dict:
    """What a resume needs from the model and the optimizer, and every rank's RNG state (collective)."""
    if sharded:
        params, optim = dist.full_state(model, opt)
    else:
        params = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        optim = opt.state_dict()
    return {"params": params, "optimizer": optim, "sharded": sharded, "rng": dist.gather(torch.get_rng_state())}


def _save(path: Path, state: dict, sched, step: int, losses: list[float]) -> None:
    state = {**state, "step": step, "losses": losses, "scheduler": sched.state_dict()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _restore(path: Path | None, model: nn.Module, opt, sched, rank: int = 0,
             sharded: bool = False) -> tuple[int, list[float]]:
    if path is None or not path.exists():
        return 0, []
    state = torch.load(path, weights_only=False)
    if state.get("sharded", False) != sharded:
        kind = {True: "FSDP", False: "data-parallel or one-process"}
        raise RuntimeError(f"{path} is from a {kind[state.get('sharded', False)]} run; this one is {kind[sharded]}. "
                           "Resume it the same way, or delete the checkpoint to start over")
    if sharded:
        dist.load_full_state(model, opt, state["params"], state["optimizer"])
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in state["params"].items():
                params[name].copy_(value)
        opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    rng = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # per rank (one: older checkpoints)
    torch.set_rng_state(rng[rank] if rank < len(rng) else rng[0])
    return state["step"], list(state["losses"])


@contextmanager
def _activation_checkpointing(model: nn.Module, on: bool):
    """HF activation checkpointing of every decoder block, on only inside this block (training).

    Non-reentrant, so it works although the frozen base's inputs never require grad, and it nests
    with a method layer's own checkpoint (LR-QAT ``checkpoint: true``)."""
    if not on:
        yield
        return
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name is deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    try:
        yield
    finally:
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()
        if hasattr(model, "_require_grads_hook"):  # transformers 5 adds it on enable and leaves it on disable
            model.disable_input_require_grads()


@contextmanager
def _stop_signals():
    """An Event set by SIGTERM / SIGUSR1 (cluster preemption) or a first Ctrl-C while training runs
    (a second Ctrl-C interrupts at once)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def first_ctrl_c(*_) -> None:
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        tqdm.write("Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again: stop now)")

    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGUSR1)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, first_ctrl_c)
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
