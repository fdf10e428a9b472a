"""``python -m qexp.plan <overrides> [--multirun]``: each stage's peak device memory for a cell,
at the real model's shapes, without loading its weights.

How. The model's architecture (its ``config.json``) is built with ``k = 1`` and ``2`` decoder
layers at the real widths and dtype, with random weights, and the stages of
:func:`qexp.run.run_cell` run on it on the CPU (load, base quantization, attach, three training
steps: forward + backward and the optimizer step are two peaks, merge, eval), each at two small
token counts ``τ``. A
:class:`~qexp.bench.measure.TensorMemory` counts the live tensor bytes, what CUDA's
``max_memory_allocated`` counts. Each stage's peak is fitted as ``a + b·k + c·T + d·k·T`` from
the four runs and evaluated at the model's layer count and at the stage's real token count:
training micro-batch × seqlen; eval batch × seqlen; one calibration forward (GPTQ's or QWHA's
batch × calib_seqlen); merge-check tokens. Activation memory is linear in tokens when attention
never forms the ``T×T`` scores (SDPA's flash / memory-efficient kernels, the default).

Shortcuts, each exact for memory: a GPTQ base is measured once per grid layout and shared by the
cells that use it (bits change code values, not shapes), and the attach, train, merge and eval
stages then start from an RTN base of the cell's own grid (RTN runs inside attach, one layer at
a time, as in a real run); a range search scans 2 candidates instead of ``quant.grid`` (it holds
one at a time); MagR runs 2 of its ``quant.magr_iters`` proximal steps (each step allocates the
same tensors; 200 steps of a 14336² matmul take hours on a CPU), and its step size, the largest
eigenvalue of ``XᵀX``, comes from power iteration in buffers of ``eigvalsh``'s sizes (an fp64
``eigvalsh`` at 14336 takes over 10 minutes on 2 CPU cores, seconds on a GPU); CLoQ's ``eigh`` of
the Hessian returns same-sized stand-ins (``SHORTCUTS`` lists the swapped functions); cells that differ only in bits
share one measurement (the test checks that bits leave every method's bytes unchanged, but
QWHA's, whose AdaAlloc budget split moves them by < 0.5 %). One assumption, to save a fourth
GPTQ run: GPTQ works block by block, so its calibration activations do not grow with layers (no
``d`` term) and its base is measured at three of the four points (checked at test scale: 4 and 6
layers within 2 %).
Calibration sequences beyond one forward batch stay in host memory.

Not counted: the CUDA context and kernels (about 0.5 GB), allocator fragmentation and cache,
lm-eval's own batches (``eval.lm_eval_batch_size``), and host memory.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from . import adapt, models
from .bench.measure import MB, TensorMemory
from .bench.worker import Trainer
from .config import CONF, ConfigError, check_group_size, method_config, register, validate
from .eval import perplexity
from .methods import cloq as cloq_module
from .methods import get as get_method
from .quant import QuantSpec
from .quant import magr as magr_module
from .quant.base import base_quantizer
from .quant.gptq import CALIB_BATCH
from .train import _activation_checkpointing as activation_checkpointing

log = logging.getLogger("qexp.plan")
ARCHS = Path(__file__).with_name("archs")  # config.json of the hub models, for offline plans
STAGES = ("load", "base", "attach", "train", "optimizer", "merge", "eval")
GIB = 2**30


def arch_config(cfg: DictConfig) -> PretrainedConfig:
    """The model's architecture: ``model.path``'s ``config.json`` (a local directory, or the hub
    and its cache), else ``qexp/archs/<model.name>.json``."""
    m = cfg.model
    if m.source in ("random", "embedded"):  # small models: load them as a run does
        return models.load(m, cfg.cache_dir)[0].config
    local = ARCHS / f"{m.name}.json"
    path = Path(str(m.path)).expanduser()
    if path.is_dir() or not local.exists():
        try:
            return AutoConfig.from_pretrained(str(path) if path.is_dir() else m.path)
        except OSError as e:
            raise ConfigError(
                f"model={m.name}: cannot read the config of model.path={m.path!r} ({str(e).splitlines()[0]}). "
                f"Give a local config: model.path=/dir/with/config.json (the config alone is enough), or "
                f"put it at {local}") from None
    return AutoConfig.from_pretrained(str(local))


@torch.no_grad()
def planned_top_eigenvalue(h: Tensor, steps: int = 30) -> Tensor:
    """:func:`qexp.quant.magr.top_eigenvalue`'s memory (the fp64 copy, ``eigvalsh``'s LAPACK copy
    and its eigenvalues: ``tests/test_plan.py`` checks the peak) with a power-iteration value."""
    d = h.double()
    work = d.clone()  # noqa: F841  (eigvalsh works on a copy)
    values = torch.empty(d.shape[0], dtype=d.dtype, device=d.device)  # noqa: F841
    v = torch.ones(d.shape[0], dtype=d.dtype, device=d.device)
    for _ in range(steps):
        v = d @ v
        v = v / v.norm().clamp_min(1e-300)
    return (v @ (d @ v)).float()


def planned_eigh(h: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh``'s outputs at their sizes (``tests/test_plan.py`` checks the peak): the
    diagonal as eigenvalues and the identity as eigenvectors (an fp64 ``eigh`` at 14336 takes tens
    of minutes on a CPU)."""
    return h.diagonal().clone(), torch.eye(h.shape[0], dtype=h.dtype, device=h.device)


# Exact for memory, not for values: the functions a plan swaps (the module doc says why).
SHORTCUTS = {(magr_module, "top_eigenvalue"): planned_top_eigenvalue, (cloq_module, "eigh"): planned_eigh}


@contextlib.contextmanager
def shortcuts():
    """Every function of ``SHORTCUTS`` swapped for its planned stand-in."""
    with contextlib.ExitStack() as swapped:
        for (module, name), planned in SHORTCUTS.items():
            swapped.enter_context(mock.patch.object(module, name, planned))
        yield


@dataclass
class Cell:
    cfg: DictConfig
    overrides: list[str]

    @property
    def label(self) -> str:
        c = self.cfg
        return f"{c.model.name} {c.method.name} w{c.bits}g{c.group_size}"


def compose_cells(overrides: list[str], multirun: bool) -> list[Cell]:
    """The cells ``python -m qexp.run <overrides> [--multirun]`` would run, each validated."""
    register()
    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    axes: dict[str, list[str]] = {}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        if multirun:
            hcfg = compose(config_name="config", overrides=fixed, return_hydra_config=True)
            fixed_keys = {o.get_key_element() for o in parsed if not o.is_sweep_override()}
            for key, value in (hcfg.hydra.sweeper.params or {}).items():
                if key not in fixed_keys:  # the command line wins, as in qexp.run
                    axes[key] = [v.strip() for v in str(value).split(",")]
        for o in parsed:
            if o.is_sweep_override():
                if not multirun:
                    raise ConfigError(f"{o.input_line}: a sweep needs --multirun")
                axes[o.get_key_element()] = list(o.sweep_string_iterator())
        cells = []
        for combo in itertools.product(*axes.values()):
            extra = [f"{k}={v}" for k, v in zip(axes, combo, strict=True)]
            cfg = compose(config_name="config", overrides=[*fixed, *extra])
            validate(cfg)
            cells.append(Cell(cfg, [*fixed, *extra]))
    return cells


class Planner:
    """Runs the stages at ``k`` layers and ``τ`` tokens and extrapolates (see the module doc)."""

    def __init__(self, layers: tuple[int, int] = (1, 2), tokens: tuple[int, int] = (32, 64),
                 device: str = "cpu") -> None:
        self.layers, self.tokens, self.device = layers, tokens, torch.device(device)
        self.bases: dict[str, float] = {}  # measured base-quantization peaks, by grid layout
        self.cells: dict[str, tuple[dict, str]] = {}  # measurements, by config without bits

    def build(self, arch: PretrainedConfig, dtype: torch.dtype, k: int) -> torch.nn.Module:
        """The random ``k``-layer model, the same weights at every call (seed 0). Built anew for each
        measurement instead of copied from a kept one: at Llama-3.1-8B's widths a 2-layer model holds
        3 GB of host memory, and the plan of a QWHA cell was OOM-killed at 14 GB with a kept copy."""
        torch.manual_seed(0)
        c = copy.deepcopy(arch)
        c.num_hidden_layers = k
        model = AutoModelForCausalLM.from_config(c, dtype=dtype).to(self.device)
        return model.eval().requires_grad_(False)

    def measure(self, cfg: DictConfig, arch: PretrainedConfig, k: int) -> dict[str, dict[int, float]]:
        """Peak MB of each stage of one cell at ``k`` layers, per token count ``τ`` (a stage that
        does not depend on tokens is measured once), and the seconds each stage took."""
        t1, t2 = self.tokens
        dtype = getattr(torch, cfg.model.dtype)
        spec = QuantSpec(cfg.bits, cfg.group_size, cfg.quant.sym)
        method = get_method(cfg.method.name)(method_config(cfg), spec)
        ids = {t: torch.randint(0, arch.vocab_size, (1, t), generator=torch.Generator().manual_seed(t)).to(self.device)
               for t in self.tokens}
        probe = torch.randint(0, arch.vocab_size, (1, cfg.eval.merge_check_tokens)).to(self.device)
        peaks: dict[str, dict[int, float]] = {}
        traces: dict[int, list[int]] = {}  # live bytes after each op of forward + backward, per τ
        secs: dict[str, float] = {}
        rtn_base = OmegaConf.merge(cfg.quant, {"init": "rtn", "grid": min(cfg.quant.grid, 2),
                                               "magr_iters": min(cfg.quant.get("magr_iters", 2), 2)})
        mem = TensorMemory(self.device)

        def stage(name: str, tau: int | None, fn) -> None:
            t0 = time.perf_counter()
            mem.reset_peak()
            fn()
            for t in ((tau,) if tau else self.tokens):
                peaks.setdefault(name, {})[t] = mem.peak()
            secs[name] = secs.get(name, 0.0) + time.perf_counter() - t0

        model = self.build(arch, dtype, k)  # outside the meter: its init's temporaries are no stage
        with mem, shortcuts():
            model = mem.adopt(model)
            peaks["load"] = {t: mem.peak() for t in self.tokens}
            targets = models.targets(model, list(cfg.model.targets))
            check_group_size(cfg.group_size, {n: t.in_features for n, t in targets.items()})
            if method.NEEDS_BASE and cfg.quant.init == "gptq":  # RTN quantizes lazily, inside attach
                for t in self.tokens:
                    key = self._layout(cfg, spec, k, t)
                    if key not in self.bases and (k, t) == (self.layers[1], t2):
                        # block by block: one block's calibration activations whatever the layer
                        # count, so no layers×tokens term; the fourth point follows from three
                        k1 = self.layers[0]
                        lay = {(kk, tt): self._layout(cfg, spec, kk, tt) for kk in (k1, k) for tt in (t1, t2)}
                        if all(lay[p] in self.bases for p in ((k1, t1), (k1, t2), (k, t1))):
                            self.bases[key] = (self.bases[lay[(k, t1)]] + self.bases[lay[(k1, t2)]]
                                               - self.bases[lay[(k1, t1)]])
                    if key not in self.bases:
                        stage("base", t, lambda t=t: self._base(cfg, spec, model, targets, ids[t]))
                        self.bases[key] = peaks["base"][t]
                    peaks.setdefault("base", {})[t] = self.bases[key]
            stage("attach", t1 if method.NEEDS_CALIB else None,
                  lambda: adapt.attach(model, method, targets, rtn_base, lambda: ids[t1], None))
            if method.TRAINS:
                model.train()
                trainer = Trainer(model, method, cfg, self.device)

                def steps(t: int, n: int) -> None:
                    """Two peaks per step, each linear in tokens (their max is not): forward +
                    backward ("train"), then clipping + optimizer step ("optimizer")."""
                    phases: dict[str, list[float]] = {"train": [], "optimizer": []}

                    def backward(loss: torch.Tensor) -> None:
                        loss.backward()
                        phases["train"].append(mem.peak())
                        traces[t], mem.timeline = mem.timeline, None
                        mem.reset_peak()

                    for _ in range(n):
                        mem.reset_peak()
                        mem.timeline = []
                        trainer.step(lambda: model(input_ids=ids[t], labels=ids[t], use_cache=False).loss, backward)
                        phases["optimizer"].append(mem.peak())
                    for name, values in phases.items():
                        peaks.setdefault(name, {})[t] = max(values)

                with activation_checkpointing(model, cfg.train.gradient_checkpointing):
                    t0 = time.perf_counter()
                    steps(t1, 2)  # the first step allocates the optimizer state
                    steps(t2, 1)
                    secs["train"] = time.perf_counter() - t0
                del trainer
                model.eval()
            stage("merge", None, lambda: adapt.merge(model, probe))
            for t in self.tokens:
                stage("eval", t, lambda t=t: perplexity(model, ids[t].reshape(-1), t, 1, 1))
        model = targets = None  # host memory: the twin below is another full model
        if method.NEEDS_CALIB:  # the calibration forwards at τ2 too, on a fresh copy
            twin = self.build(arch, dtype, k)
            with TensorMemory(self.device) as mem2, shortcuts():
                mem2.adopt(twin)
                mem2.reset_peak()  # the attach stage alone, as above
                twin_targets = models.targets(twin, list(cfg.model.targets))
                fresh = get_method(cfg.method.name)(method_config(cfg), spec)
                adapt.attach(twin, fresh, twin_targets, rtn_base, lambda: ids[t2], None)
                peaks["attach"][t2] = mem2.peak()
        return {**peaks, "seconds": secs, "traces": {"train": traces} if traces else {}}

    @staticmethod
    def _layout(cfg: DictConfig, spec: QuantSpec, k: int, tau: int) -> str:
        """What the base quantizer's memory depends on: the grid layout and code dtype, not bits."""
        return json.dumps({**OmegaConf.to_container(cfg.quant), "calib_samples": None, "group_size": cfg.group_size,
                           "int16_codes": spec.qmax > 127, "model": cfg.model.name, "dtype": cfg.model.dtype,
                           "targets": list(cfg.model.targets), "k": k, "tau": tau}, sort_keys=True)

    @staticmethod
    def _base(cfg: DictConfig, spec: QuantSpec, model, targets, ids) -> None:
        """GPTQ on every target (it computes them all before attach swaps any); MagR, when on, runs
        2 of its iterations (each allocates the same)."""
        quant = OmegaConf.merge(cfg.quant, {"magr_iters": min(cfg.quant.get("magr_iters", 2), 2)})
        quantize = base_quantizer(quant, spec, model, targets, lambda: ids, None)
        qws = {n: quantize(n, t) for n, t in targets.items()}  # noqa: F841  (held, as attach holds them)

    @staticmethod
    def measurement_key(cfg: DictConfig) -> str:
        """The config without ``bits``, unresolved: what bits decide (a ``by_bits`` learning rate or
        epoch count) changes no tensor shape either, so those cells share one measurement too."""
        return json.dumps({**OmegaConf.to_container(cfg, resolve=False), "bits": None,
                           "int16_codes": cfg.bits > 7}, sort_keys=True, default=str)

    def plan(self, cell: Cell) -> dict:
        """The cell's predicted peak per stage. Cells that differ only in ``bits`` (same code
        dtype) share one measurement: bits change code values, not tensor shapes."""
        cfg = cell.cfg
        arch = arch_config(cfg)
        key = self.measurement_key(cfg)
        t0 = time.perf_counter()
        if key not in self.cells:
            self.cells[key] = ({k: self.measure(cfg, arch, k) for k in self.layers}, cell.label)
        runs, measured_as = self.cells[key]
        real = stage_tokens(cfg)
        n_layers = arch.num_hidden_layers
        stages = {s: round(extrapolate(runs, s, n_layers, real[s], self.layers, self.tokens), 1)
                  for s in STAGES if s in runs[self.layers[0]]}
        peak_stage = max(stages, key=stages.get)
        return {"cell": cell.label, "overrides": cell.overrides, "model": cfg.model.name,
                "method": cfg.method.name, "bits": cfg.bits, "group_size": cfg.group_size,
                "dtype": cfg.model.dtype, "layers": n_layers, "tokens": real, "stages_mb": stages,
                "peak_mb": stages[peak_stage], "peak_stage": peak_stage, "measured_as": measured_as,
                "measured_mb": {f"k{k}": {s: r[s] for s in STAGES if s in r} for k, r in runs.items()},
                "seconds": {f"k{k}": {s: round(v, 1) for s, v in r["seconds"].items()} for k, r in runs.items()},
                "plan_s": round(time.perf_counter() - t0, 1)}


def stage_tokens(cfg: DictConfig) -> dict[str, int]:
    """Tokens on the device at once in each stage of a real run of ``cfg``."""
    t, q, e = cfg.train, cfg.quant, cfg.eval
    calib = min(q.calib_samples, CALIB_BATCH) * q.calib_seqlen
    if "calib_batch" in cfg.method:  # methods that run their own calibration forwards (QWHA)
        calib = max(calib, cfg.method.calib_batch * q.calib_seqlen)
    return {"load": 0, "base": calib, "attach": calib, "train": t.batch_size * t.seqlen, "optimizer": 0,
            "merge": e.merge_check_tokens, "eval": e.batch_size * e.seqlen}


def extrapolate(runs: dict, stage: str, layers: int, tokens: int, ks: tuple[int, int],
                taus: tuple[int, int]) -> float:
    """``a + b·k + c·T + d·k·T`` through the four measured points, at (``layers``, ``tokens``).

    A stage with op-by-op traces (training's forward + backward) is extrapolated in tokens moment
    by moment, then maximised: its peak is a max over moments, each linear in tokens, and at a few
    tokens it sits at a different moment (weight-sized temporaries) than at thousands (activations)."""
    (k1, k2), (t1, t2) = ks, taus

    def at_tokens(k: int) -> float:
        trace = runs[k].get("traces", {}).get(stage)
        if trace and len(trace[t1]) == len(trace[t2]):  # the same ops at both token counts
            lo, hi = torch.tensor(trace[t1], dtype=torch.float64), torch.tensor(trace[t2], dtype=torch.float64)
            return float((lo + (hi - lo) * (tokens - t1) / (t2 - t1)).max()) / MB
        lo, hi = runs[k][stage][t1], runs[k][stage][t2]
        return lo + (hi - lo) * (tokens - t1) / (t2 - t1)

    p1, p2 = at_tokens(k1), at_tokens(k2)
    return p1 + (p2 - p1) * (layers - k1) / (k2 - k1)


def validation(planner: Planner, cell: Cell, layers: tuple[int, int], tokens: int) -> dict:
    """The plan's prediction at ``layers`` (measured with more layers than it uses) against a
    measured run at the same widths, stage by stage, at ``tokens`` per stage."""
    cfg, arch = cell.cfg, arch_config(cell.cfg)
    small = {k: planner.measure(cfg, arch, k) for k in planner.layers}
    big = Planner(layers, (tokens // 2, tokens), planner.device)
    rows = []
    for k in layers:
        measured = big.measure(cfg, arch, k)
        for stage in STAGES:
            if stage in measured:
                t = cfg.eval.merge_check_tokens if stage == "merge" else tokens
                pred = extrapolate(small, stage, k, t, planner.layers, planner.tokens)
                got = measured[stage][tokens]
                rows.append({"layers": k, "stage": stage, "tokens": t, "predicted_mb": round(pred, 1),
                             "measured_mb": round(got, 1), "error_pct": round(100 * (pred / got - 1), 2)})
    return {"cell": cell.label, "overrides": cell.overrides, "from_layers": planner.layers,
            "from_tokens": planner.tokens, "rows": rows}


def table(row: dict) -> str:
    """One cell's stages as a Markdown table (GiB)."""
    lines = [f"### {row['cell']} ({row['dtype']}, {row['layers']} layers)", "", "| stage | tokens | peak GiB |",
             "|---|---:|---:|"]
    for stage, mb in row["stages_mb"].items():
        lines.append(f"| {stage} | {row['tokens'][stage]} | {mb * MB / GIB:.2f} |")
    lines.append(f"| **total (peak)** | | **{row['peak_mb'] * MB / GIB:.2f}** ({row['peak_stage']}) |")
    if "command" in row:
        lines += ["", f"`{row['command']}`"]
    return "\n".join(lines)


def summary(rows: list[dict], gpu_gib: float) -> str:
    """One line per cell: the peak stage and whether it fits one GPU of ``gpu_gib``."""
    lines = ["| cell | " + " | ".join(STAGES) + f" | peak GiB | fits {gpu_gib:g} GiB |",
             "|---|" + "---:|" * (len(STAGES) + 2)]
    for r in rows:
        cols = [f"{r['stages_mb'][s] * MB / GIB:.1f}" if s in r["stages_mb"] else "—" for s in STAGES]
        peak = r["peak_mb"] * MB / GIB
        lines.append(f"| {r['cell']} | " + " | ".join(cols) + f" | {peak:.1f} | {'yes' if peak <= gpu_gib else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m qexp.plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="the same overrides as python -m qexp.run")
    p.add_argument("--multirun", "-m", action="store_true", help="every cell of the sweep (as qexp.run --multirun)")
    p.add_argument("--out", default=None, help="JSON output (default: results/plan/<name>.json)")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="the GPU size the summary checks against")
    p.add_argument("--layers", default="1,2", help="the two layer counts k measured")
    p.add_argument("--tokens", default="32,64", help="the two token counts τ measured")
    p.add_argument("--validate", default=None, metavar="K1,K2",
                   help="instead of planning: measure K1 and K2 layers and compare with the prediction")
    p.add_argument("--validate-tokens", type=int, default=256, help="tokens per stage in --validate")
    p.add_argument("--update", action="store_true",
                   help="keep the cells of an existing --out JSON that this run does not plan (each cell names "
                        "the command that planned it)")
    args = p.parse_intermixed_args(argv)  # overrides before and after the flags, as qexp.run takes them
    logging.basicConfig(level=logging.WARNING)
    cells = compose_cells(args.overrides, args.multirun)
    planner = Planner(_pair(p, "--layers", args.layers), _pair(p, "--tokens", args.tokens))
    command = "python -m qexp.plan " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.validate:
        checks = [validation(planner, c, _pair(p, "--validate", args.validate), args.validate_tokens) for c in cells]
        for c in checks:
            print(f"### {c['cell']}\n\n| layers | stage | tokens | predicted MB | measured MB | error % |\n"
                  "|---:|---|---:|---:|---:|---:|")
            print("\n".join(f"| {r['layers']} | {r['stage']} | {r['tokens']} | {r['predicted_mb']} | "
                            f"{r['measured_mb']} | {r['error_pct']:+.2f} |" for r in c["rows"]), "\n", flush=True)
        out = Path(args.out or "results/plan/validation.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": command, "torch": torch.__version__, "checks": checks}, indent=1) + "\n")
        print(f"written: {out}")
        return checks
    rows = []
    for cell in cells:
        rows.append({**planner.plan(cell), "command": command})
        print(table(rows[-1]), "\n", flush=True)
    out = Path(args.out or Path(cells[0].cfg.results_dir) / "plan" / f"{cells[0].cfg.name}.json")
    if args.update and out.exists():
        old, fresh = json.loads(out.read_text()), {r["cell"]: r for r in rows}
        rows = [fresh.pop(r["cell"], {"command": old["command"], **r}) for r in old["cells"]] + list(fresh.values())
        command = "; ".join(dict.fromkeys(r["command"] for r in rows))
    print(summary(rows, args.gpu_gib))
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"command": command,
           "layers": planner.layers, "tokens": planner.tokens, "torch": torch.__version__,
           "note": "predicted peak device memory per stage, MB (2**20 bytes); see qexp/plan.py", "cells": rows}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n\n".join(table(r) for r in rows) + "\n\n" + summary(rows, args.gpu_gib) + "\n")
    print(f"written: {out} and {out.with_suffix('.md')}")
    return rows


def _pair(p: argparse.ArgumentParser, flag: str, text: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError:
        p.error(f"{flag}={text!r} is not valid; give two increasing positive integers, e.g. 1,2")
    if not 0 < a < b:
        p.error(f"{flag}={text!r} is not valid; give two increasing positive integers, e.g. 1,2")
    return a, b


if __name__ == "__main__":
    main()
