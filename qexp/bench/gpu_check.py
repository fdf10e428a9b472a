"""``python -m qexp.bench.gpu_check``: every method on a GPU at paper widths, in minutes.

For each registered method: a 2-layer model with Llama-3-8B's widths (``qexp/archs``) in bf16,
the method attached (RTN base; GPTQ for ``gptq``), 3 training steps at micro-batch × seqlen,
the merge check, and one eval forward. It records the median step time and the peak CUDA
memory (``max_memory_allocated``) per stage, each as a ratio to LoRA's in the same run, the
merge report, and :mod:`qexp.plan`'s prediction of the training peak (from 1 and 2 layers at
two small token counts) against the measured one. One JSON goes to ``results/gpu/``.

``--arch smollm2_135m --device cpu`` runs the same code on the CPU in seconds (the test does).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from .. import adapt, models
from ..eval import perplexity
from ..methods import registry
from ..plan import Planner, arch_config, extrapolate
from .measure import MB, Memory, TensorMemory, clock, machine
from .worker import Trainer, build_method, compose_cfg

REFERENCE = "lora"


def check(method: str, arch_model: str, dtype: str, batch: int, seqlen: int, dev: torch.device,
          planner: Planner) -> dict:
    """One method: measured stages on ``dev``, and the plan's prediction of its training peak."""
    cfg = compose_cfg(method, [f"model={arch_model}", f"model.dtype={dtype}", f"train.batch_size={batch}",
                               f"train.seqlen={seqlen}", "quant.calib_samples=8", "quant.calib_seqlen=512"])
    arch = copy.deepcopy(arch_config(cfg))
    arch.num_hidden_layers = 2
    mem = Memory(dev) if dev.type == "cuda" else TensorMemory(dev)
    row: dict = {"method": method, "layers": 2, "tokens": batch * seqlen}
    torch.manual_seed(0)
    with mem if isinstance(mem, TensorMemory) else nullcontext():
        mem.reset_peak()
        model = AutoModelForCausalLM.from_config(arch, dtype=getattr(torch, dtype)).to(dev).eval()
        model.requires_grad_(False)
        row["load_mb"] = mem.peak()
        ids = torch.randint(0, arch.vocab_size, (batch, seqlen), device=dev)
        calib = torch.randint(0, arch.vocab_size, (cfg.quant.calib_samples, cfg.quant.calib_seqlen), device=dev)
        m = build_method(cfg)
        targets = models.targets(model, list(cfg.model.targets))
        mem.reset_peak()
        t0 = clock(dev)
        adapt.attach(model, m, targets, cfg.quant, lambda: calib, None)
        row["attach_s"] = clock(dev) - t0
        row["attach_mb"] = mem.peak()
        if m.TRAINS:
            trainer = Trainer(model, m, cfg, dev)
            mem.reset_peak()
            times = [trainer.step(lambda: model(input_ids=ids, labels=ids, use_cache=False).loss,
                                  lambda loss: loss.backward())["step"] for _ in range(3)]
            row["train_mb"] = mem.peak()
            row["step_ms"] = 1000 * statistics.median(times[1:])  # the first step allocates the state
            del trainer
            model.eval()
        mem.reset_peak()
        row["merge"] = adapt.merge(model, ids[:1, :cfg.eval.merge_check_tokens])
        row["merge_mb"] = mem.peak()
        mem.reset_peak()
        row["ppl_random"] = perplexity(model, ids.reshape(-1), seqlen, batch, batch)["ppl"]
        row["eval_mb"] = mem.peak()
    if m.TRAINS:
        runs = {k: planner.measure(cfg, arch_config(cfg), k) for k in planner.layers}
        row["plan_train_mb"] = max(extrapolate(runs, "train", 2, batch * seqlen, planner.layers, planner.tokens),
                                   extrapolate(runs, "optimizer", 2, 0, planner.layers, planner.tokens))
        row["plan_error_pct"] = 100 * (row["plan_train_mb"] / row["train_mb"] - 1)
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m qexp.bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="llama3_8b", help="a model config whose architecture to use (2 layers)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--methods", default="all", help="comma-separated, or all")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="results/gpu/gpu_check.json")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    methods = sorted(registry()) if args.methods == "all" else args.methods.split(",")
    planner = Planner((1, 2), (64, 128), device=args.device)
    rows = []
    for method in methods:
        t0 = time.perf_counter()
        try:
            rows.append(check(method, args.arch, args.dtype, args.batch, args.seqlen, dev, planner))
        except Exception as e:  # one method's failure is recorded; the others still run
            rows.append({"method": method, "error": f"{type(e).__name__}: {e}"})
        rows[-1]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(rows[-1], default=str), flush=True)
    ref = next((r for r in rows if r["method"] == REFERENCE and "step_ms" in r), {})
    for r in rows:
        for key in ("step_ms", "train_mb"):
            if key in r and key in ref:
                r[f"x_lora_{key}"] = r[key] / ref[key]
    doc = {"command": "python -m qexp.bench.gpu_check " + " ".join(argv or []), "machine": machine(dev),
           "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "arch": args.arch,
           "dtype": args.dtype, "batch": args.batch, "seqlen": args.seqlen, "memory_unit": f"MB ({MB} bytes)",
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"written: {args.out}")
    return doc


if __name__ == "__main__":
    main()
