"""``python -m qexp.run <overrides>``: compose one config and run one cell.

load → quantize → adapt → train → merge → evaluate → record (→ export)
"""

from __future__ import annotations

import logging
from functools import cache

import hydra
from accelerate.utils import set_seed
from omegaconf import DictConfig

from . import adapt, data, dist, export, models
from .config import STAGES, check_group_size, method_config, register
from .eval import accuracy, check_generation, perplexity
from .eval.lmeval import suite_note
from .methods import get as get_method
from .preflight import check
from .quant import QuantSpec
from .results import Record
from .tracking import wandb_run
from .train import train

log = logging.getLogger("qexp")
register()


def run_cell(cfg: DictConfig) -> dict:
    """Run one cell end to end and return its record (also written to ``result.json``).

    A cell whose record says ``ok`` is skipped (``force=true`` reruns it); one done with the same
    id in another sweep under ``results_dir`` is copied (``reused_from``); an interrupted cell
    resumes from its last training checkpoint. A cell another launch is running (its lock is live)
    is left to it. Every value, file and shape is checked first: a config error writes nothing.
    """
    check(cfg)
    dist.setup(cfg)  # one cell on several processes: qexp/dist.py (who does what)
    rec = Record(cfg)
    if not rec.claim():
        log.info("skip %s: another launch is running it (%s)", rec.dir, rec.data["lock"])
        return rec.data
    done = None if cfg.force else rec.previous if rec.previous.get("status") == "ok" else rec.reuse()
    if done:
        rec.release()
        log.info("skip %s: already done%s (force=true reruns)", rec.dir,
                 f" in {done['reused_from']}" if done.get("reused_from") else "")
        if cfg.export.formats:
            log.warning("export not written for a done cell: `python -m qexp.export %s` (or force=true)", rec.dir)
        return done
    with rec.open():
        log.info("run %s", rec.dir)
        with wandb_run(cfg, rec.data["cell_id"], rec.dir, rec.dir.name) as tracker:
            set_seed(cfg.seed, deterministic=True)
            with rec.timer("load"):
                model, tok = models.load(cfg.model, cfg.cache_dir, dist.device())  # the GPU if any (accelerate)
                check_generation(tok, cfg.eval, [cfg.data.train.format])  # a chat protocol needs a chat template
                targets = models.targets(model, list(cfg.model.targets))
                check_group_size(cfg.group_size, {n: m.in_features for n, m in targets.items()})
                evalsets = {k: data.eval_tokens(src, tok, cfg.eval.seqlen, cfg.eval.max_windows)
                            for k, src in cfg.data.eval.items()}
            calib = cache(lambda: data.calibration(cfg.data.calib or cfg.data.train, tok, cfg.quant.calib_samples,
                                                   cfg.quant.calib_seqlen, cfg.seed))
            spec = QuantSpec(cfg.bits, cfg.group_size, cfg.quant.sym)
            method = get_method(cfg.method.name)(method_config(cfg), spec)

            @dist.main_only  # evaluated once
            def evaluate(stage: str) -> None:
                with rec.timer(f"eval_{stage}"):
                    for name, ids in evalsets.items():
                        r = perplexity(model, ids, cfg.eval.seqlen, cfg.eval.max_windows, cfg.eval.batch_size)
                        rec.metrics[f"ppl/{name}/{stage}"] = r.pop("ppl")
                        e = rec.data["eval"].setdefault(name, {}) | {k: r[k] for k in ("seqlen", "windows", "tokens")}
                        e.setdefault("window_nll", {})[stage] = r["window_nll"]  # for the analysis' bootstrap
                        rec.data["eval"][name] = e
                    if cfg.eval.tasks and stage in cfg.eval.accuracy_stages:
                        metrics, details = accuracy(model, tok, cfg.eval, cfg.cache_dir, rec.dir / f"samples_{stage}")
                        rec.metrics.update({f"{k}/{stage}": v for k, v in metrics.items()})
                        rec.data["eval"].setdefault("lm_eval", {})[stage] = details

            if cfg.eval.fp_reference:
                evaluate("fp")
            with rec.timer("quantize"):  # base quantizer (RTN / GPTQ) + the method's layers
                gptq_cache = models.cache_root(cfg.cache_dir) / "gptq" if cfg.quant.cache else None
                rec.data["quant_act"] = adapt.attach(model, method, targets, cfg.quant, calib, gptq_cache)  # + act/KV
                rec.data["init"] = method.report()  # e.g. QWHA's layer-output error after init
            if cfg.eval.base:
                evaluate("base")
            if method.TRAINS:
                draws = cfg.train.steps * cfg.train.batch_size * cfg.train.grad_accum  # a hub corpus streams this many
                chunks = data.lm_chunks(cfg.data.train, tok, cfg.train.seqlen, draws)
                result = train(model, method, chunks, cfg.train, cfg.seed, rec.checkpoint, tracker.log)
                model = result["model"]  # with FSDP: gathered whole on the main process
                rec.data["train"] = {"steps": result["steps"], "resumed_from": result["resumed_from"],
                                     **{k: result[k] for k in ("world_size", "fsdp", "micro_batch_per_rank",
                                                               "grad_accum", "global_batch")},
                                     "loss_first": result["losses"][0], "loss_last": result["losses"][-1],
                                     "losses": result["losses"]}
                rec.data["timings"]["train_s"] = round(result["train_s"], 3)
            if method.EVAL_UNMERGED:
                evaluate("unmerged")
            probe = next(iter(evalsets.values())).reshape(-1)[: cfg.eval.merge_check_tokens].unsqueeze(0)
            probe = probe.to(model.device)
            adapters = dist.main_only(export.adapters)(model) if cfg.export.formats else None  # base + adapter
            with rec.timer("merge"):
                rec.data["merge"] = dist.main_only(adapt.merge)(model, probe) or {}
            evaluate("final")
            rec.check_collapse(model.config.vocab_size)
            if cfg.export.formats:
                with rec.timer("export"):
                    rec.data["export"] = dist.main_only(export.write)(model, tok, rec.data, cfg, adapters)
            tracker.summary({**rec.metrics, **{f"merge/{k}": v for k, v in rec.data["merge"].items()}})
    dist.main_only(rec.checkpoint.unlink)(missing_ok=True)
    return rec.data


def summary(rec: dict) -> str:
    """A few lines for the terminal."""
    c = rec["config"]
    lines = [f"cell {rec['cell_id']}: method={c['method']['name']} model={c['model']['name']} bits={c['bits']} "
             f"group_size={c['group_size']} status={rec['status']}"]
    if rec["status"] == "locked":
        return lines[0] + f" (running in another launch: {rec['lock']})"
    lines += [f"  WARNING {w}" for w in rec.get("warnings", [])]
    for name in c["data"]["eval"]:
        stages = [s for s in STAGES if f"ppl/{name}/{s}" in rec["metrics"]]
        lines.append(f"  ppl {name}: " + "  ".join(f"{s} {rec['metrics'][f'ppl/{name}/{s}']:.3f}" for s in stages))
    for task in c["eval"].get("tasks", []):
        stages = [s for s in STAGES if f"exact_match/{task}/{s}" in rec["metrics"]]
        if stages:
            lm = {s: rec["eval"].get("lm_eval", {}).get(s, {}) for s in stages}
            se = {s: lm[s].get("results", {}).get(task, {}).get("exact_match_stderr") for s in stages}
            n, limit = lm[stages[-1]].get("tasks", {}).get(task, {}).get("items"), lm[stages[-1]].get("limit")
            lines.append(f"  exact_match {task}: " + "  ".join(f"{s} {rec['metrics'][f'exact_match/{task}/{s}']:.4f}"
                                                              + (f"±{se[s]:.4f}" if se[s] else "") for s in stages)
                         + (f"  ({n} items{f' (eval.limit={limit})' if limit else ''})" if n else ""))
    for suite in c["eval"].get("suites", {}):
        for metric in ("acc", "acc_norm"):
            stages = [s for s in STAGES if f"{metric}/{suite}/{s}" in rec["metrics"]]
            notes = {s: suite_note(rec["eval"].get("lm_eval", {}).get(s, {}), suite, metric) for s in stages}
            values = [f"{s} {rec['metrics'][f'{metric}/{suite}/{s}']:.4f}" + (f"±{se:.4f}" if se else "")
                      for s, (se, _) in notes.items()]  # value ± standard error
            if stages:
                items = notes[stages[-1]][1]
                lines.append(f"  {metric} {suite}: " + "  ".join(values) + (f"  ({items})" if items else ""))
    m = rec["merge"]
    lines.append(f"  merge: deployed={m.get('deployed')} lossless={m.get('lossless')} "
                 f"max|Δlogit|={m.get('max_abs_logit_diff', float('nan')):.3g}")
    t = rec["timings"]
    lines.append(f"  time: total {t.get('total_s', 0):.1f}s (train {t.get('train_s', 0):.1f}s)  "
                 f"peak RSS {rec['memory'].get('peak_rss_mb', 0):.0f} MB")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    rec = run_cell(cfg)
    dist.main_only(print)(f"{summary(rec)}\n  result: {rec['dir']}/result.json")
    return rec  # to the sweep's report (qexp.callbacks)


if __name__ == "__main__":
    main()
