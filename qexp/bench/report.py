"""Medians, ratios to LoRA, the issue's targets, and the Markdown the benchmark prints."""

from __future__ import annotations

import math

from .measure import median

PHASES = ("step", "fwd", "bwd", "opt")
NO_TRAIN = ("rtn", "gptq", "fp")

# Why a method costs more than LoRA per step, from its training forward/backward (the FLOP
# floor at the model's token counts; n = d_out·d_in, T = tokens). Used where a target is missed.
WHY = {
    "peqa": "∂L/∂s needs the dense weight gradient G = gyᵀx (a third GEMM of the layer's size; LoRA has two) "
            "plus the dequantize passes",
    "qat": "dense weight gradient G (third GEMM) + LSQ+ fake-quant passes + AdamW over every weight (3 full-size "
           "optimizer tensors)",
    "l4q": "dense G (third GEMM) + the memory-saving backward recomputes W₀+αBA and the LSQ codes (a second "
           "weight build)",
    "lrqat": "dense G (third GEMM) + the checkpoint rebuilds Ŵ in the backward (its memory saving) + AB products "
             "at rank 32 (2·r flops per weight per product, three of them)",
    "lota": "dense G (third GEMM) + ΔW = BA and ∂A, ∂B at rank 64 (≈ 3·2·64 flops per weight: about 0.75 GEMM "
            "at T=256) + ternarization and group means",
    "qwha": "dense G (third GEMM) + the inverse WHT of the whole F in the forward and of G in the backward "
            "(n·log2 d_in adds each way)",
    "qalora": "dequantizes the frozen base every step (LoRA's base is already float)",
    "qlora": "same work as LoRA (the base is dequantized once at attach in this uniform-grid QLoRA*)",
    "cloq": "dequantizes the frozen base every step + LoRA dropout on the adapter input",
}


def _key(row: dict) -> tuple | None:
    return tuple(row["shape"]) if row.get("shape") else None


def summarize(rows: list[dict], reference: str) -> None:
    """Medians over the rounds, then ratios to ``reference`` (steps, memory) and to fp (eval)."""
    for row in rows:
        rounds = row.get("rounds") or []
        for k in PHASES:
            if rounds:
                row[f"{k}_ms"] = 1000 * median([r[k] for r in rounds])
        if rounds:
            row["step_ms_min"] = 1000 * min(r["step"] for r in rounds)
            row["step_ms_max"] = 1000 * max(r["step"] for r in rounds)
        if row.get("eval_rounds"):
            row["eval_tok_s"] = median(row["eval_rounds"])
    ref = {_key(r): r for r in rows if r["method"] == reference}
    fp = {_key(r): r for r in rows if r["method"] == "fp"}
    for row in rows:
        lo, f = ref.get(_key(row), {}), fp.get(_key(row), {})
        row["x_lora_step"] = _ratio(row.get("step_ms"), lo.get("step_ms"))
        row["x_lora_mem"] = _ratio(row.get("peak_mb"), lo.get("peak_mb"))
        row["x_fp_eval"] = _ratio(row.get("eval_tok_s"), f.get("eval_tok_s"))


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def targets(result: dict) -> list[str]:
    """The issue's targets checked on every scale and shape, with the reason where one is missed."""
    lines = []
    for scale, res in result["scales"].items():
        for row in res["rows"]:
            where = f"{scale}" + (f" {row['shape'][0]}×{row['shape'][1]}" if row.get("shape") else "")
            m, x = row["method"], row.get("x_lora_step")
            if x is not None and m not in ("lora", *NO_TRAIN) and x > 1.15:
                over = " (> 1.5×)" if x > 1.5 else ""
                lines.append(f"step ≤ 1.15× LoRA missed: {m} at {where}: {x:.2f}×{over}: {WHY.get(m, 'see notes')}")
            if m == "lrqat" and row.get("x_lora_mem") is not None:
                ok = "met" if row["x_lora_mem"] <= 0.6 else "missed"
                lines.append(f"lrqat peak ≤ 0.6× LoRA-on-fp {ok} at {where}: {row['x_lora_mem']:.2f}×")
    lines.append("merged integer eval ≥ 1.0× fp where a packed kernel exists: qexp has no packed integer kernel "
                 "(QuantLinear dequantizes to float, then F.linear), so the target does not apply; the ×fp "
                 "column shows what the dequantize-per-forward costs")
    return lines


def _f(v: float | None, fmt: str = "", none: str = "—") -> str:
    """``fmt`` or, without one, 3 significant digits (no exponent) for the value's size."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    if not fmt:
        fmt = ".0f" if abs(v) >= 100 else ".1f" if abs(v) >= 10 else ".2f"
    return format(v, fmt)


def _x(v: float | None) -> str:
    return _f(v, ".2f") + ("×" if v is not None else "")


def table(rows: list[dict]) -> str:
    head = ("| method | setup s | step ms | ×LoRA | fwd / bwd / opt ms | peak MB | ×LoRA | state MB "
            "| eval tok/s | ×fp | deployed |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['method']} | error: {r['error']} |" + " |" * 9)
            continue
        split = (f"{_f(r.get('fwd_ms'))} / {_f(r.get('bwd_ms'))} / {_f(r.get('opt_ms'))}"
                 if r.get("step_ms") is not None else "—")
        setup = _f(r.get("setup_s"), ".2f") if "setup_note" not in r else f"n/a ({r['setup_note']})"
        lines.append(f"| {r['method']} | {setup} | {_f(r.get('step_ms'))} | {_x(r.get('x_lora_step'))} | {split} "
                     f"| {_f(r.get('peak_mb'))} | {_x(r.get('x_lora_mem'))} | {_f(r.get('state_mb'))} "
                     f"| {_f(r.get('eval_tok_s'))} | {_x(r.get('x_fp_eval'))} | {r.get('deployed', '')} |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    m = result["machine"]
    dev = m.get("gpu") or f"CPU: {m['cpu']}"
    out = ["# qexp.bench: training cost of every method, side by side", "",
           f"- date: {result['date']}; wall time {result.get('wall_s', '?')} s",
           f"- machine: {dev}; {m['cpu_count']} cores; torch {m['torch']} on {m['device']}, "
           f"{m['torch_threads']} thread(s) (OMP_NUM_THREADS={m.get('omp_num_threads')})",
           f"- command: `{result['command']}`", ""]
    for scale, res in result["scales"].items():
        s = res["settings"]
        if scale == "model":
            out += [f"## Model scale: {s['model']}, batch {s['batch']} × seqlen {s['seqlen']}, "
                    f"{s['bits']} bits, group {s['group_size']}", ""]
            out += [table(res["rows"]), ""]
        else:
            for shape in s["shapes"]:
                rows = [r for r in res["rows"] if r.get("shape") == shape]
                out += [f"## Layer scale: d_in×d_out = {shape[0]}×{shape[1]}, {s['tokens']} tokens, {s['dtype']}, "
                        f"{s['bits']} bits, group {s['group_size']}, RTN base", ""]
                out += [table(rows), ""]
        out += [f"Rounds: {s['repeats']} interleaved × ({s['warmup']} warm-up + {s['steps']} timed); "
                f"overrides: `{' '.join(s['overrides'])}`", ""]
    out += ["## Targets (ratios to LoRA on the same model, same run)", ""]
    out += [f"- {t}" for t in result.get("targets", [])]
    out += ["", "## How it is measured", "", HOW.strip(), "", "## Notes: optimizations", "", NOTES.strip(), ""]
    return "\n".join(out)


HOW = """
- **step ms**: one optimizer step as `qexp.train` takes it (forward + `loss.item()` + backward + grad clip +
  `opt.step()` + scheduler + `zero_grad()`), median over rounds of the per-round median; every method is
  reloaded (pickled after setup) in each round, and the rounds visit the methods round-robin from a rotating
  start, so drift of a shared machine hits all of them alike. fwd / bwd / opt split the same steps.
- **peak MB**: one fresh process per method (and per layer shape in that process): the peak over
  `--mem-steps` training steps, minus the memory in use before the model (layer) was built. So it counts
  what the method keeps (weights in its own form, adapters, optimizer state) plus the transient training
  memory. CPU: peak RSS (`VmHWM`, reset via `/proc/self/clear_refs` before the steps) with glibc's mmap
  threshold fixed so freed tensors leave the RSS; CUDA: `max_memory_allocated`. **state MB**: bytes of the
  parameters and buffers after setup (exact).
- **eval tok/s**: forward passes over the fixed batch of the merged (deployed) model, no grad, median;
  ×fp is against the unquantized model (layer: a plain `nn.Linear`).
- **setup s**: `adapt.attach` (base quantizer + the method's `prepare` and `layer`): RTN, GPTQ, QWHA's
  Hessians + AdaAlloc + refinement, CLoQ's eigh + SVD. Data preparation is excluded. At the layer scale the
  base is RTN and the calibration activations are random (a cost measurement, not a quality one).
"""

NOTES = """
(see qexp/bench/__init__.py for the full record of each change: prediction, measurement)
"""
