"""One method's setup, memory and merge, in a fresh process (``qexp.bench.worker.main(JOB.json)``).

A fresh process per method keeps the peak-memory meters (RSS on CPU) free of other methods'
leftovers. The worker builds the method the way :func:`qexp.run.run_cell` does (compose the
config, ``models.load``, ``adapt.attach``; for the layer scale one random ``nn.Linear`` inside
a small holder module), times that setup, pickles the attached module for the parent's timing
rounds, runs a few training steps under the memory meter, merges, and pickles the merged
module for the eval rounds. It writes one JSON answer next to the job file.
"""

from __future__ import annotations

import json
import math
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate.utils import set_seed
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch import Tensor, nn
from transformers import get_scheduler

from .. import adapt, data, models
from ..config import CONF, calibrated_stages, check_group_size, method_config, register, validate
from ..methods import Method, MethodLayer
from ..methods import get as get_method
from ..quant import QuantSpec
from .measure import Memory, clock, device, materialize, tensor_mb

N_BATCHES = 4  # distinct training batches, cycled
MERGE_PROBE_TOKENS = 64


def compose_cfg(method: str, overrides: list[str]) -> DictConfig:
    """The config ``python -m qexp.run method=<method> <overrides>`` would run (W&B off), checked."""
    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"method={method}", "tracking=disabled", *overrides])
    validate(cfg)
    return cfg


def build_method(cfg: DictConfig) -> Method:
    return get_method(cfg.method.name)(method_config(cfg), QuantSpec(cfg.bits, cfg.group_size, cfg.quant.sym))


class Trainer:
    """One optimizer step exactly as :func:`qexp.train.train` takes it (without accelerate's
    wrappers, which are pass-throughs on one device): forward, ``loss.item()``, backward, clip,
    ``opt.step()``, ``sched.step()``, ``opt.zero_grad()``. Each phase is timed separately."""

    def __init__(self, model: nn.Module, method: Method, cfg: DictConfig, dev: torch.device) -> None:
        t = cfg.train
        self.model, self.dev, self.max_norm = model, dev, t.max_grad_norm
        self.opt = method.optimizer(model, t.lr, t.weight_decay, t.steps)
        self.sched = get_scheduler(t.scheduler, self.opt, num_warmup_steps=int(t.warmup_ratio * t.steps),
                                   num_training_steps=t.steps)
        self.params = [p for g in self.opt.param_groups for p in g["params"]]
        model.train()

    def step(self, forward: Callable[[], Tensor], backward: Callable[[Tensor], None]) -> dict[str, float]:
        t0 = clock(self.dev)
        out = forward()
        t1 = clock(self.dev)
        backward(out)
        t2 = clock(self.dev)
        if self.max_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad()
        t3 = clock(self.dev)
        return {"fwd": t1 - t0, "bwd": t2 - t1, "opt": t3 - t2, "step": t3 - t0}


def model_step_fns(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Callable, Callable]:
    def forward() -> Tensor:
        loss = model(**batch).loss
        if not math.isfinite(loss.item()):  # train.py's per-step check (a host sync)
            raise FloatingPointError(f"loss is {loss.item()}")
        return loss

    return forward, lambda loss: loss.backward()


def layer_step_fns(layer: nn.Module, x: Tensor, gy: Tensor) -> tuple[Callable, Callable]:
    """``y = layer(x)``, then ``y.backward(gy)`` (a fixed upstream gradient; ``x`` needs grad as
    every layer's input does inside a model, so the input gradient is computed too)."""
    def forward() -> Tensor:
        x.grad = None
        return layer(x)

    return forward, lambda y: y.backward(gy)


# ------------------------------------------------------------------------------- model scale

def model_job(job: dict) -> list[dict]:
    dev, mem = device(), Memory(device())
    method_name = job["method"]
    cfg = compose_cfg("lora" if method_name == "fp" else method_name, job["overrides"])
    tmp = Path(job["tmp"])
    set_seed(cfg.seed, deterministic=False)
    base = mem.now()
    model, tok = models.load(cfg.model, cfg.cache_dir)
    materialize(model)
    model.to(dev)
    row: dict = {"method": method_name, "shape": None}
    if method_name == "fp":  # the unquantized model: eval reference, and the shared batches
        chunks = data.lm_chunks(cfg.data.train, tok, cfg.train.seqlen)
        it = data.batches(chunks, cfg.train.batch_size, cfg.seed)
        batches = [next(it) for _ in range(N_BATCHES)]
        torch.save(batches, tmp / "batches.pt")
        torch.save(model, tmp / "fp.merged.pt")
        return [{**row, "trains": False, "state_mb": tensor_mb(model), "merged": str(tmp / "fp.merged.pt"),
                 "deployed": "float (reference)"}]
    batches = [{k: v.to(dev) for k, v in b.items()} for b in torch.load(tmp / "batches.pt")]
    method = build_method(cfg)
    targets = models.targets(model, list(cfg.model.targets))
    check_group_size(cfg.group_size, {n: m.in_features for n, m in targets.items()})
    needs_calib = method.NEEDS_CALIB or (method.NEEDS_BASE and bool(calibrated_stages(cfg.quant)))
    calib = (data.calibration(cfg.data.calib or cfg.data.train, tok, cfg.quant.calib_samples, cfg.quant.calib_seqlen,
                              cfg.seed) if needs_calib else None)  # data preparation is not setup
    t0 = clock(dev)
    adapt.attach(model, method, targets, cfg.quant, lambda: calib)
    row["setup_s"] = clock(dev) - t0
    row["setup_detail"] = {k: v for k, v in getattr(method, "stats", {}).items() if k.endswith("_s")}
    row.update(trains=method.TRAINS, state_mb=tensor_mb(model))
    if method.TRAINS:
        torch.save(model, tmp / f"{method_name}.train.pt")
        row["train"] = str(tmp / f"{method_name}.train.pt")
        row.update(_memory(model, method, cfg, dev, mem, base, [model_step_fns(model, b) for b in batches],
                           job["mem_steps"]))
    model.eval()
    probe = batches[0]["input_ids"][:1, :MERGE_PROBE_TOKENS]
    merge = adapt.merge(model, probe)
    row["deployed"] = merge["deployed"]
    row["lossless"] = merge["lossless"]
    torch.save(model, tmp / f"{method_name}.merged.pt")
    row["merged"] = str(tmp / f"{method_name}.merged.pt")
    return [row]


def _memory(model: nn.Module, method: Method, cfg: DictConfig, dev: torch.device, mem: Memory, base: float,
            fns: list[tuple[Callable, Callable]], steps: int) -> dict:
    """Peak memory over ``steps`` training steps (the first allocates the optimizer state)."""
    trainer = Trainer(model, method, cfg, dev)
    before = mem.now()
    mem.reset_peak()
    for i in range(steps):
        trainer.step(*fns[i % len(fns)])
    peak = mem.peak()
    del trainer
    return {"peak_mb": peak - base, "train_extra_mb": peak - before, "mem_steps": steps}


# ------------------------------------------------------------------------------- layer scale

class LayerHolder(nn.Module):
    """A one-layer "model" for ``adapt.attach``: token ids in, the target ``layer`` applied to
    seeded random activations (so a method's ``prepare`` can collect calibration statistics)."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, input_ids: Tensor) -> Tensor:
        g = torch.Generator().manual_seed(int(input_ids.sum()))
        x = torch.randn(*input_ids.shape, self.layer.in_features, generator=g)
        return self.layer(x.to(self.layer.weight.device, self.layer.weight.dtype))


def layer_dtype(dev: torch.device) -> torch.dtype:
    return torch.bfloat16 if dev.type == "cuda" else torch.float32


def layer_inputs(d_in: int, d_out: int, tokens: int, dev: torch.device, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``x [tokens, d_in]`` (needs grad) and the upstream gradient ``gy [tokens, d_out]``."""
    g = torch.Generator().manual_seed(seed)
    dt = layer_dtype(dev)
    x = torch.randn(tokens, d_in, generator=g).to(dev, dt).requires_grad_(True)
    gy = (torch.randn(tokens, d_out, generator=g) / math.sqrt(tokens * d_out)).to(dev, dt)
    return x, gy


def layer_job(job: dict) -> list[dict]:
    dev, mem = device(), Memory(device())
    method_name = job["method"]
    cfg = compose_cfg("lora" if method_name == "fp" else method_name, job["overrides"])
    tmp = Path(job["tmp"])
    rows = []
    for d_in, d_out in job["shapes"]:
        row: dict = {"method": method_name, "shape": [d_in, d_out]}
        try:
            if method_name == "fp":  # the plain linear: the eval reference
                torch.manual_seed(cfg.seed)
                lin = nn.Linear(d_in, d_out, bias=False, device=dev, dtype=layer_dtype(dev)).requires_grad_(False)
                torch.save(lin, tmp / f"fp.{d_in}x{d_out}.merged.pt")
                row.update(trains=False, state_mb=tensor_mb(lin), merged=str(tmp / f"fp.{d_in}x{d_out}.merged.pt"),
                           deployed="Linear (reference)")
            else:
                row.update(_layer_case(cfg, method_name, d_in, d_out, job, dev, mem, tmp))
        except Exception as e:  # one shape failing (e.g. a size QWHA's transform refuses) is one row
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        rows.append(row)
    return rows


def _layer_case(cfg: DictConfig, name: str, d_in: int, d_out: int, job: dict, dev: torch.device, mem: Memory,
                tmp: Path) -> dict:
    tag = f"{name}.{d_in}x{d_out}"
    base = mem.now()
    torch.manual_seed(cfg.seed)
    linear = nn.Linear(d_in, d_out, bias=False, device=dev, dtype=layer_dtype(dev)).requires_grad_(False)
    method = build_method(cfg)
    out: dict = {}
    skip = method.NEEDS_CALIB and job["calib_max_din"] is not None and d_in > job["calib_max_din"]
    calib = None
    if method.NEEDS_CALIB and not skip:
        seqlen = cfg.quant.calib_seqlen
        calib = torch.arange(max(1, job["calib_tokens"] // seqlen) * seqlen).view(-1, seqlen)
    holder = LayerHolder(linear)
    if skip:  # the calibrated init costs O(d_in³) here: build the same trainable layer uncalibrated
        out["setup_note"] = f"calibrated init skipped (d_in > {job['calib_max_din']})"
        _uncalibrated(holder, method, cfg, linear)
    else:
        t0 = clock(dev)
        adapt.attach(holder, method, {"layer": linear}, cfg.quant, lambda: calib)
        out["setup_s"] = clock(dev) - t0
        out["setup_detail"] = {k: v for k, v in getattr(method, "stats", {}).items() if k.endswith("_s")}
    del linear
    layer = holder.layer
    out.update(trains=method.TRAINS, state_mb=tensor_mb(layer))
    if method.TRAINS:
        torch.save(holder, tmp / f"{tag}.train.pt")
        out["train"] = str(tmp / f"{tag}.train.pt")
        x, gy = layer_inputs(d_in, d_out, job["tokens"], dev)
        out.update(_memory(holder, method, cfg, dev, mem, base, [layer_step_fns(layer, x, gy)], job["mem_steps"]))
        del x, gy
    merged = layer.merge() if isinstance(layer, MethodLayer) else layer
    torch.save(merged, tmp / f"{tag}.merged.pt")
    out["merged"] = str(tmp / f"{tag}.merged.pt")
    out["deployed"] = type(merged).__name__
    return out


def _uncalibrated(holder: LayerHolder, method: Method, cfg: DictConfig, linear: nn.Linear) -> None:
    """The method's training layer without its calibrated init (same parameters, same step)."""
    from ..methods.cloq import CLoQLinear
    from ..methods.lora import lora_factors
    from ..quant.base import base_quantizer

    qw = base_quantizer(cfg.quant, method.spec, holder, {"layer": linear}, lambda: None)("layer", linear)
    if method.name == "qwha":
        method.cfg.select, method.cfg.init = "random", "zero"  # random locations, c = 0: the same p train
        method.prepare(holder, {"layer": linear}, None)
        holder.layer = method.layer("layer", linear, qw)
    elif method.name == "cloq":
        c = method.cfg
        a, b = lora_factors(linear.in_features, linear.out_features, c.rank, linear.weight)
        holder.layer = CLoQLinear(qw, None, a.data, b.data, c.alpha / c.rank, c.dropout)
    else:
        raise ValueError(f"method={method.name} needs calibration and has no uncalibrated layer-scale build")


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    torch.set_grad_enabled(True)
    try:
        rows = model_job(job) if job["scale"] == "model" else layer_job(job)
        answer = {"rows": rows}
    except Exception as e:
        answer = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    Path(job_path).with_suffix(".out.json").write_text(json.dumps(answer))

