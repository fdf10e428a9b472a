"""The training loop, on accelerate (device placement, gradient accumulation, DDP/FSDP).

Why accelerate and not the HF Trainer: methods bring their own optimizers (t-SignSGD has no
learning rate) and their own parameter groups, and the loop stays short enough to read in one
sitting; accelerate still gives multi-GPU launch (``accelerate launch``) without code changes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from .config import TrainConfig
from .methods import Method


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss."""


def train(model: nn.Module, method: Method, batches: Iterator[dict], cfg: TrainConfig,
          log: Callable[[dict, int], None] = lambda m, s: None) -> dict:
    """Run ``cfg.steps`` optimizer steps; returns ``{"losses", "train_s", "steps"}``."""
    acc = Accelerator(gradient_accumulation_steps=cfg.grad_accum)
    opt = method.optimizer(model, cfg.lr, cfg.weight_decay, cfg.steps)
    sched = get_scheduler(cfg.scheduler, opt, num_warmup_steps=int(cfg.warmup_ratio * cfg.steps),
                          num_training_steps=cfg.steps)
    model, opt, sched = acc.prepare(model, opt, sched)
    params = [p for g in opt.param_groups for p in g["params"]]
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=f"train {method.name}", disable=not acc.is_local_main_process)
    for step in bar:
        total = 0.0
        for _ in range(cfg.grad_accum):
            batch = {k: v.to(acc.device) for k, v in next(batches).items()}
            with acc.accumulate(model):
                loss = model(**batch).loss
                if not math.isfinite(loss.item()):
                    raise NonFiniteLoss(f"loss is {loss.item()} at step {step}")
                acc.backward(loss)
                if acc.sync_gradients and cfg.max_grad_norm:
                    acc.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad()
            total += loss.item() / cfg.grad_accum
        losses.append(total)
        bar.set_postfix(loss=f"{total:.4f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            log({"train/loss": total, "train/lr": sched.get_last_lr()[0]}, step + 1)
    model.eval()
    acc.free_memory()
    return {"losses": losses, "train_s": time.perf_counter() - t0, "steps": cfg.steps}


@torch.no_grad()
def max_logit_diff(before: torch.Tensor, after: torch.Tensor) -> float:
    return float((before.float() - after.float()).abs().max())
