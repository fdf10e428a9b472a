"""``python -m qexp.bench``: every method's training cost, side by side (see :mod:`qexp.bench`)."""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..config import ROOT
from ..methods import registry
from . import report
from .measure import WORKER_ENV, clock, device, machine, median, no_gc
from .worker import (
    Trainer,
    build_method,
    compose_cfg,
    layer_inputs,
    layer_step_fns,
    model_step_fns,
)
from .worker import main as worker_main

LLAMA3_8B = ["4096x4096", "4096x14336", "14336x4096"]  # d_in x d_out: q/o, gate/up, down projections
REFERENCE = "lora"


def parse_shape(text: str) -> tuple[int, int]:
    try:
        d_in, d_out = (int(v) for v in text.lower().split("x"))
    except ValueError:
        msg = f"--shapes: {text!r} is not valid; write D_INxD_OUT, e.g. 4096x14336"
        raise argparse.ArgumentTypeError(msg) from None
    if d_in <= 0 or d_out <= 0:
        raise argparse.ArgumentTypeError(f"--shapes: {text!r} is not valid; both sizes must be positive")
    return d_in, d_out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qexp.bench", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scale", choices=("model", "layer", "both"), default="both")
    p.add_argument("--methods", default="all",
                   help="comma-separated method names, or 'all' (every registered method; rtn/gptq only for "
                        "setup and eval, gptq not at the layer scale, whose base is RTN)")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=None, help="default: 64 (model), 128 (layer)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds over all methods (medians over them)")
    p.add_argument("--steps", type=int, default=3, help="timed train steps (and eval forwards) per method per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per method per round")
    p.add_argument("--mem-steps", type=int, default=2, help="steps under the memory meter (fresh process each)")
    p.add_argument("--batch", type=int, default=1, help="model scale: sequences per step")
    p.add_argument("--seqlen", type=int, default=256, help="model scale: tokens per sequence")
    p.add_argument("--model", default="smollm2_135m", help="model config (conf/model)")
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=[parse_shape(s) for s in LLAMA3_8B],
                   help="layer scale: D_INxD_OUT (default: Llama-3-8B's q/o, gate/up and down projections)")
    p.add_argument("--tokens", type=int, default=None, help="layer scale: rows of x (default: 2048 on GPU, 256 on CPU)")
    p.add_argument("--calib-tokens", type=int, default=2048, help="layer scale: random-activation calibration rows")
    p.add_argument("--calib-max-din", type=int, default=None,
                   help="layer scale: skip calibrated inits (QWHA, CLoQ; O(d_in³)) above this d_in "
                        "(default: 4096 on CPU, none on GPU)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override for every method (repeatable), e.g. quant.calib_samples=32")
    p.add_argument("--no-isolate", dest="isolate", action="store_false",
                   help="run the per-method setup/memory jobs in this process (fast; memory numbers unreliable)")
    p.add_argument("--out", default="results/bench", help="directory for bench.json and bench.md")
    p.add_argument("--note", default="", help="a line about this run for the Markdown (e.g. what else ran)")
    p.add_argument("--render", metavar="BENCH_JSON", default=None,
                   help="measure nothing: write bench.md again from a saved bench.json (current notes and targets)")
    return p


def select_methods(p: argparse.ArgumentParser, text: str) -> list[str]:
    valid = sorted(registry())
    names = valid if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in valid]
    if bad or not names:
        p.error(f"--methods: {', '.join(map(repr, bad)) or repr(text)} is not valid; choose from: all, "
                f"{', '.join(valid)}")
    if REFERENCE not in names:  # every ratio is to LoRA on the same model
        names = [REFERENCE, *names]
    return names


def run_job(job: dict, tmp: Path, isolate: bool) -> list[dict]:
    """A worker job in a fresh process (or here): rows, or one error row per shape."""
    path = tmp / f"job.{job['scale']}.{job['method']}.json"
    path.write_text(json.dumps(job))
    t0 = time.perf_counter()
    if isolate:
        env = {**os.environ, **WORKER_ENV}
        src = str(ROOT)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
        # imported by name (not run as __main__), so the pickled holder classes resolve in this process
        entry = "import sys; from qexp.bench.worker import main; main(sys.argv[1])"
        proc = subprocess.run([sys.executable, "-c", entry, str(path)], env=env,
                              capture_output=True, text=True)
        if proc.returncode:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return _errors(job, f"worker exited with {proc.returncode}: {tail[0]}")
    else:
        worker_main(str(path))
    answer = json.loads(path.with_suffix(".out.json").read_text())
    if "error" in answer:
        print(answer.get("traceback", ""), file=sys.stderr)
        return _errors(job, answer["error"])
    print(f"  {job['scale']:5s} {job['method']:6s} set up in {time.perf_counter() - t0:6.1f}s", file=sys.stderr)
    return answer["rows"]


def _errors(job: dict, msg: str) -> list[dict]:
    shapes = job.get("shapes") or [None]
    return [{"method": job["method"], "shape": s, "error": msg} for s in shapes]


def rotate(items: list, r: int) -> list:
    """Round ``r`` visits the methods starting at a different one (no fixed position bias)."""
    k = r % len(items) if items else 0
    return items[k:] + items[:k]


def step_rounds(rows: list[dict], args, dev: torch.device, inputs: Callable[[dict], list]) -> None:
    """Interleaved timing: each round loads every method afresh and times ``args.steps`` steps."""
    cases = [r for r in rows if r.get("train")]
    cfgs = {r["method"]: compose_cfg(r["method"], args.job_overrides) for r in cases}
    for r in range(args.repeats):
        for case in rotate(cases, r):
            holder = torch.load(case["train"], map_location=dev, weights_only=False)
            trainer = Trainer(holder, build_method(cfgs[case["method"]]), cfgs[case["method"]], dev)
            fns = inputs(case, holder)
            for i in range(args.warmup):
                trainer.step(*fns[i % len(fns)])
            with no_gc():
                times = [trainer.step(*fns[(args.warmup + i) % len(fns)]) for i in range(args.steps)]
            case.setdefault("rounds", []).append({k: median([t[k] for t in times]) for k in times[0]})
            del trainer, holder, fns
            gc.collect()


def eval_rounds(rows: list[dict], args, dev: torch.device, run: Callable[[dict, torch.nn.Module], Callable],
                tokens: int) -> None:
    """Interleaved forward throughput of every merged model (and the fp reference)."""
    cases = [r for r in rows if r.get("merged")]
    for r in range(args.repeats):
        for case in rotate(cases, r):
            module = torch.load(case["merged"], map_location=dev, weights_only=False).eval()
            fwd = run(case, module)
            with torch.no_grad():
                fwd()
                with no_gc():
                    times = []
                    for _ in range(args.steps):
                        t0 = clock(dev)
                        fwd()
                        times.append(clock(dev) - t0)
            case.setdefault("eval_rounds", []).append(tokens / median(times))
            del module, fwd
            gc.collect()


def run_scale(scale: str, methods: list[str], args, dev: torch.device, tmp: Path) -> dict:
    group = args.group_size or (64 if scale == "model" else 128)
    overrides = [f"bits={args.bits}", f"group_size={group}", *args.overrides]
    if scale == "model":
        overrides += [f"model={args.model}", f"train.batch_size={args.batch}", f"train.seqlen={args.seqlen}"]
        names = ["fp", *methods]
    else:
        overrides += ["quant.init=rtn"]  # the layer scale's base quantizer (GPTQ needs a model's activations)
        # no model activations here: GPTQ and the methods that need a calibrated base (omniquant, awq, ...) are left out
        names = ["fp", *[m for m in methods if m != "gptq" and not getattr(registry()[m], "BASE", None)]]
    args.job_overrides = overrides
    job = {"scale": scale, "overrides": overrides, "tmp": str(tmp), "mem_steps": args.mem_steps,
           "shapes": [list(s) for s in args.shapes], "tokens": args.tokens, "calib_tokens": args.calib_tokens,
           "calib_max_din": args.calib_max_din}
    print(f"[{scale}] setup and memory, one process per method:", file=sys.stderr)
    rows = [row for m in names for row in run_job({**job, "method": m}, tmp, args.isolate)]
    print(f"[{scale}] timing: {args.repeats} interleaved rounds of {args.warmup}+{args.steps} steps", file=sys.stderr)
    if scale == "model":
        batches = [{k: v.to(dev) for k, v in b.items()} for b in torch.load(tmp / "batches.pt")]
        step_rounds(rows, args, dev, lambda case, model: [model_step_fns(model, b) for b in batches])
        ids = batches[0]["input_ids"]
        eval_rounds(rows, args, dev, lambda case, model: (lambda: model(input_ids=ids)), ids.numel())
    else:
        data = {tuple(s): layer_inputs(*s, args.tokens, dev) for s in args.shapes}
        step_rounds(rows, args, dev, lambda case, holder: [layer_step_fns(holder.layer, *data[tuple(case["shape"])])])
        eval_rounds(rows, args, dev, lambda case, module: (lambda: module(data[tuple(case["shape"])][0].detach())),
                    args.tokens)
    report.summarize(rows, REFERENCE)
    settings = {"bits": args.bits, "group_size": group, "overrides": overrides, "repeats": args.repeats,
                "steps": args.steps, "warmup": args.warmup, "mem_steps": args.mem_steps}
    if scale == "model":
        settings.update(model=args.model, batch=args.batch, seqlen=args.seqlen)
    else:
        settings.update(shapes=[list(s) for s in args.shapes], tokens=args.tokens, calib_tokens=args.calib_tokens,
                        calib_max_din=args.calib_max_din, dtype=str("bfloat16" if dev.type == "cuda" else "float32"))
    return {"settings": settings, "rows": rows}


def render(path: Path) -> dict:
    """``bench.md`` next to ``path`` from its JSON, with this version's notes and target check."""
    result = json.loads(path.read_text())
    result["targets"] = report.targets(result)
    result["rendered"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = report.markdown(result)
    path.write_text(json.dumps(result, indent=1, default=float))
    (path.parent / "bench.md").write_text(md)
    print(md)
    return result


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    if args.render:
        return render(Path(args.render))
    methods = select_methods(p, args.methods)
    for key in ("repeats", "steps", "mem_steps", "batch", "seqlen"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')}={getattr(args, key)} is not valid; use a positive integer")
    if args.warmup < 0:
        p.error(f"--warmup={args.warmup} is not valid; use 0 or more")
    dev = device()
    if args.tokens is None:
        args.tokens = 2048 if dev.type == "cuda" else 256
    if args.calib_max_din is None and dev.type == "cpu":
        args.calib_max_din = 4096
    scales = ["model", "layer"] if args.scale == "both" else [args.scale]
    t0 = time.perf_counter()
    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(dev),
              "command": "python -m qexp.bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "methods": methods, "note": args.note, "scales": {}}
    with tempfile.TemporaryDirectory(prefix="qexp-bench-") as tmp:
        for scale in scales:
            result["scales"][scale] = run_scale(scale, methods, args, dev, Path(tmp))
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["targets"] = report.targets(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = report.markdown(result)
    (out / "bench.json").write_text(json.dumps(result, indent=1, default=float))
    (out / "bench.md").write_text(md)
    print(md)
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}", file=sys.stderr)
    return result
