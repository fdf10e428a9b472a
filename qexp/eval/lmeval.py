"""Accuracy of the in-memory model through lm-eval (``HFLM(pretrained=model, tokenizer=tok)``).

Each task in ``cfg.eval.tasks`` runs in its own ``simple_evaluate`` call (so each gets its own time
and few-shot count), with lm-eval's default seeds (its samples are written next to the record only
with ``eval.log_samples``); the global RNG states (Python, NumPy, torch) are restored afterwards,
so training after the base evaluation draws the same numbers as without it.

Generative tasks (``output_type: generate_until``, qexp/tasks/qexp_{gsm8k,gsm8k_cot,sql,viggo,asdiv}.yaml)
run in the same call: HFLM generates greedily, batched (``lm_eval_batch_size``), with the KV cache and
a progress bar; ``eval.max_new_tokens`` overrides the task's ``max_gen_toks``; a task whose YAML says
``metadata.chat_template: true`` gets the tokenizer's chat template (:func:`check_generation` refuses
a tokenizer without one before any work). ``eval.task_data.<task>`` replaces a task's test data with a
local JSONL file (same fields as the hub rows), for machines without hub access.

Forwards that share a prompt prefix (the few-shot exemplars) run it once (``eval.prefix_cache``,
:mod:`qexp.eval.prefix`); hits, misses and its length are in ``tasks.<task>.prefix_cache``.
Integer layers are dequantized once per task for the pass (:func:`qexp.quant.linear.dequantized_once`:
the same numbers; it saves most for generation, one token per forward, and little for
multiple-choice scoring, where the matmuls dominate). Each suite average's standard error is recorded
(``suites.<suite>.stderr``) beside lm-eval's per-task ones (``results.<task>.<metric>_stderr``) and
the item limit (``limit``).

Per-item scores (for the analysis' bootstrap over items) are kept in the record, compactly:
``details["items"][<task>] = {"acc": "0110…", "acc_norm": "…"}``, one character per item in doc_id
order (``doc_ids`` only where they are not 0..n-1), a few KB per task (:func:`item_scores`).

Metric names (the caller appends ``/<stage>``):
  ``exact_match/<task>``  the generative tasks' exact match (each paper's answer extraction,
      qexp/tasks/generation.py)
  ``acc/<task>``, ``acc_norm/<task>``  lm-eval's acc / acc_norm of every task and group it reports
      (acc_norm only where the task defines it; a group such as ``mmlu`` and its categories too).
  ``acc/<suite>``       mean of the members' acc.
  ``acc_norm/<suite>``  mean of the members' acc_norm, taking acc for members that have none
      (BoolQ, WinoGrande, MMLU): the papers do not say which they average, so both are recorded, and
      the metric used for each member is written to ``eval.lm_eval.<stage>.suites``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import ConfigError
from ..quant.linear import dequantized_once
from ..tasks import FILES, TASKS_DIR, data_dir, yaml_path

log = logging.getLogger("qexp")

# The papers' lm-eval names (conf/eval/papers.yaml); tests check them against lm-eval's registry.
PAPER_TASKS = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "mmlu"]
MMLU_CATEGORIES = ["mmlu_humanities", "mmlu_stem", "mmlu_social_sciences", "mmlu_other"]
METRICS = ("acc", "acc_norm", "exact_match")


@cache
def task_manager(hub: bool):
    """lm-eval's TaskManager with qexp's offline pack; ``hub`` also indexes lm-eval's own tasks (~10-30 s)."""
    from lm_eval.tasks import TaskManager

    from ..tasks import TASKS_DIR

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=hub)


def pack_task(name: str) -> bool:
    """A task of qexp's own pack (a YAML in qexp/tasks), offline or hub-backed."""
    return yaml_path(name).exists()


def task_config(name: str) -> dict:
    """A pack task's YAML as lm-eval reads it (``!function`` resolved against qexp/tasks)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(yaml_path(name), resolve_func=True, recursive=True)


def task_spec(name: str, cache_dir: str, ecfg: Any = None) -> str | dict:
    """What ``simple_evaluate`` gets for ``name``: a pack task's config (offline data directory set to
    ``<cache_dir>/tasks`` and checked to exist; ``ecfg.task_data`` and ``ecfg.max_new_tokens`` applied),
    or the registry name itself."""
    if not pack_task(name):
        return name
    cfg = task_config(name)
    local = (ecfg.get("task_data") or {}).get(name) if ecfg is not None else None
    if local is not None:
        path = Path(local).expanduser()
        if not path.exists():
            raise ConfigError(f"eval.task_data.{name}={local!r} does not exist")
        cfg |= {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}}, "test_split": "test"}
        for key in ("dataset_name", "process_docs", "training_split", "validation_split", "fewshot_split"):
            cfg.pop(key, None)
    elif name in FILES:
        d = data_dir(cache_dir)
        missing = [f for f in FILES[name] if not (d / f).exists()]
        if missing:
            raise ConfigError(f"offline task {name} needs {', '.join(missing)} in {d}: run "
                              f"`python -m qexp.tasks.build --cache-dir {cache_dir}` (`make setup` does)")
        cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"], "data_dir": str(d)}
    elif os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConfigError(f"task {name} reads the hub dataset {cfg['dataset_path']!r}, but the hub is offline "
                          f"here: give a local copy with eval.task_data.{name}=<file.jsonl>")
    if ecfg is not None and ecfg.get("max_new_tokens") is not None and "generation_kwargs" in cfg:
        cfg["generation_kwargs"] = {**cfg["generation_kwargs"], "max_gen_toks": int(ecfg.max_new_tokens)}
    return cfg


def needs_chat_template(name: str) -> bool:
    return pack_task(name) and bool(task_config(name).get("metadata", {}).get("chat_template"))


def check_generation(tok: Any, ecfg: Any, formats: list[str] = ()) -> None:
    """Before any work: a task or training format whose protocol uses the chat template needs a
    tokenizer that has one."""
    from ..data.formats import FORMATS

    users = [f"eval.tasks: {t}" for t in ecfg.tasks if needs_chat_template(t)]
    users += [f"data format {f}" for f in formats if f in FORMATS and FORMATS[f].chat]
    if users and not getattr(tok, "chat_template", None):
        raise ConfigError(f"{', '.join(users)} follow a protocol with the model's chat template, and this "
                          f"model's tokenizer ({getattr(tok, 'name_or_path', '?')}) has none: use an instruct "
                          f"model (e.g. model=llama3.1_8b_instruct), as the paper does")


def check_tasks(tasks: list[str]) -> None:
    """Every name is a qexp pack task or an lm-eval registry name (indexes the registry only if needed)."""
    hub = [t for t in tasks if not pack_task(t)]
    if not hub:
        return
    known = set(task_manager(True).all_tasks)
    bad = [t for t in hub if t not in known]
    if bad:
        pack = sorted(p.stem for p in TASKS_DIR.glob("qexp_*.yaml"))
        raise ConfigError(f"eval.tasks: {bad} are neither qexp pack tasks ({', '.join(pack)}) nor lm-eval "
                          f"task/group names; the papers' names are {', '.join(PAPER_TASKS)}")


@contextmanager
def _quiet():
    """lm-eval logs every task's setup at INFO: show its warnings only, unless qexp logs at DEBUG."""
    lg = logging.getLogger("lm_eval")
    old = lg.level
    if not log.isEnabledFor(logging.DEBUG):
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        lg.setLevel(old)


@contextmanager
def _keep_rng():
    """lm-eval seeds and draws from the global generators: give the run its own states back."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def suite_scores(results: dict[str, dict], suites: dict[str, list[str]]) -> tuple[dict[str, float], dict]:
    """``acc/<suite>`` and ``acc_norm/<suite>`` from per-task ``{"acc": x, "acc_norm": y}`` results,
    and for each suite the metric averaged for each member (or why the suite was skipped)."""
    metrics, info = {}, {}
    for suite, members in suites.items():
        missing = sorted({m for m in members if m not in results or "acc" not in results[m]})
        if missing:
            info[suite] = {"skipped": f"no accuracy for {missing}"}
            continue
        norm = ["acc_norm" if "acc_norm" in results[m] else "acc" for m in members]
        metrics[f"acc/{suite}"] = sum(results[m]["acc"] for m in members) / len(members)
        metrics[f"acc_norm/{suite}"] = sum(results[m][k] for m, k in zip(members, norm, strict=True)) / len(members)
        info[suite] = {"tasks": list(members), "acc": ["acc"] * len(members), "acc_norm": norm}
    return metrics, info


def suite_note(details: dict, suite: str, metric: str) -> tuple[float | None, str]:
    """The standard error of a recorded suite average (the members' lm-eval standard errors, combined
    as for a mean of independent tasks: sqrt(sum (c·se)^2) / n, a task listed c times counting c times
    its score, as ARC in the papers' averages) and its item counts, e.g. ``"50 items per task
    (eval.limit=50)"``. ``details``: one stage's ``eval.lm_eval`` record entry."""
    info, results = details.get("suites", {}).get(suite, {}), details.get("results", {})
    members, keys = info.get("tasks", []), info.get(metric, [])
    errs = {m: results.get(m, {}).get(f"{k}_stderr") for m, k in zip(members, keys, strict=False)}
    se = (math.sqrt(sum((members.count(m) * e) ** 2 for m, e in errs.items())) / len(members)
          if errs and None not in errs.values() else None)
    items = sorted({details.get("tasks", {}).get(m, {}).get("items") for m in members} - {None})
    counts = "-".join(str(i) for i in (items[:1] + items[-1:] if len(items) > 1 else items))
    limit = f" (eval.limit={details['limit']})" if details.get("limit") else ""
    return se, f"{counts} items per task{limit}" if items else ""


def item_scores(samples: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """lm-eval's logged samples → per task, each metric's per-item 0/1 scores as a string in doc_id
    order (``"0110"``; a metric with other values: a list of floats rounded to 4 decimals), with
    ``doc_ids`` where they are not 0..n-1. Only the unfiltered answers (filter ``none``), as the
    recorded metrics are."""
    out: dict[str, dict[str, Any]] = {}
    for task, rows in samples.items():
        rows = sorted((r for r in rows if r.get("filter", "none") == "none"), key=lambda r: r["doc_id"])
        if not rows:
            continue
        entry: dict[str, Any] = {}
        ids = [int(r["doc_id"]) for r in rows]
        if ids != list(range(len(ids))):
            entry["doc_ids"] = ids
        for m in METRICS:
            values = [r.get(m) for r in rows]
            if any(not isinstance(v, int | float) for v in values):
                continue
            entry[m] = ("".join(str(int(v)) for v in values) if all(v in (0, 1) for v in values)
                        else [round(float(v), 4) for v in values])
        out[task] = entry
    return out


def accuracy(model: nn.Module, tok: Any, ecfg: Any, cache_dir: str,
             samples_dir: Path | None = None) -> tuple[dict[str, float], dict]:
    """Run ``ecfg.tasks`` on ``model``; return (metrics without the stage suffix, details for the record).

    ``ecfg``: the ``eval`` config (tasks, num_fewshot, limit, lm_eval_batch_size, suites, log_samples).
    """
    from lm_eval import simple_evaluate

    from .prefix import PrefixCache, PrefixLM

    tasks = list(ecfg.tasks)
    check_tasks(tasks)
    tm = task_manager(any(not pack_task(t) for t in tasks))
    device = next(model.parameters()).device
    was_training = model.training
    lm = PrefixLM(pretrained=model, tokenizer=tok, batch_size=ecfg.lm_eval_batch_size, device=str(device))
    results: dict[str, dict] = {}
    details: dict[str, Any] = {"tasks": {}, "limit": ecfg.limit, "items": {}}
    for name in tasks:
        t0, c0 = time.perf_counter(), time.process_time()
        lm.prefix = PrefixCache(model) if ecfg.prefix_cache else None  # per task: its own prefix
        with _quiet(), _keep_rng(), torch.no_grad(), dequantized_once(model):  # integer layers: once per task
            out = simple_evaluate(model=lm, tasks=[task_spec(name, cache_dir, ecfg)], task_manager=tm,
                                  num_fewshot=ecfg.num_fewshot.get(name), limit=ecfg.limit,
                                  apply_chat_template=needs_chat_template(name),
                                  log_samples=True, bootstrap_iters=1000)  # samples: per-item scores
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        for task, r in out["results"].items():
            results[task] = {m: float(r[f"{m},none"]) for m in METRICS if isinstance(r.get(f"{m},none"), float)}
            results[task] |= {f"{m}_stderr": float(r[f"{m}_stderr,none"]) for m in METRICS
                              if isinstance(r.get(f"{m}_stderr,none"), float)}
        details["items"] |= item_scores(out.get("samples", {}))
        n = sum(v["effective"] for v in out.get("n-samples", {}).values())
        details["tasks"][name] = {"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3), "items": n,
                                  "num_fewshot": out.get("n-shot", {}).get(name, 0)}
        if (pc := lm.prefix) is not None:
            details["tasks"][name]["prefix_cache"] = {"hits": pc.hits, "misses": pc.misses,
                                                      "tokens": 0 if pc.tokens is None else len(pc.tokens)}
        log.info("lm-eval %s: %s (%d items, %.1f s)", name,
                 {k: round(v, 4) for k, v in results.get(name, {}).items()}, n, seconds)
        if ecfg.log_samples and samples_dir is not None:
            samples_dir.mkdir(parents=True, exist_ok=True)
            for task, rows in out.get("samples", {}).items():
                with open(samples_dir / f"{task}.jsonl", "w") as f:
                    for row in rows:
                        f.write(json.dumps(row, default=str) + "\n")
    model.train(was_training)
    metrics = {f"{m}/{task}": r[m] for task, r in results.items() for m in METRICS if m in r}
    suite_metrics, details["suites"] = suite_scores(results, dict(ecfg.suites))
    details["results"] = results
    for suite, info in details["suites"].items():  # each average's standard error, in the record too
        if "tasks" in info:
            info["stderr"] = {m: suite_note(details, suite, m)[0] for m in ("acc", "acc_norm")}
    return metrics | suite_metrics, details
