"""``python -m qexp.export.deploy``: real inference engines load qexp's exports on CPU, measured.

The merged model is the embedded SmolLM2-135M with every target rounded by qexp's RTN (min-max,
as ``method=rtn``), group size 64. It is exported with :func:`qexp.export.export_model`, then:

* **GPTQModel** (torch kernel) loads ``gptq/`` at 2/3/4/8 bits, symmetric and asymmetric, in
  float16: each layer's dequantized weight against qexp's reload of the same file, logits on the
  probe tokens against qexp's merged model, and perplexity (``--gptq-ppl-grids``, on
  ``--gptq-ppl-windows`` windows: its float16 matmuls are slow on CPU).
* **llama.cpp** (``llama-cpp-python``) loads ``gguf/`` (Q4_1 at 4 bits asymmetric, Q8_0 at 8 bits
  symmetric) and an F16 GGUF of the 4-bit merged model (its weights dequantized): logits on the
  probe tokens and perplexity against qexp's merged model, and greedy decode tokens/s of the
  three files side by side (same threads, interleaved rounds, median).

Probe tokens are the first 64 of the perplexity stream; perplexity uses the windows qexp's cells
use (``data=embedded``: ``wikitext_sample``, ``eval.seqlen`` 512, ``eval.max_windows`` 8). Each
engine's numbers go to ``results/deploy/<engine>.json`` and into the export's ``report.json``
(``engines``). A missing engine is recorded with its install command and skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch import nn

from .. import data, models
from ..config import CONF, register
from ..eval import perplexity
from ..quant import QuantLinear, QuantSpec, rtn
from . import engines, export_model, gguf_file, load
from .checkpoint import float_state
from .engines import EngineMissing

log = logging.getLogger("qexp")
COMMAND = "python -m qexp.export.deploy"
GROUP = 64


def setup() -> tuple:
    """The default config (embedded model and data), the fp model, tokenizer and the eval ids."""
    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config")
    model, tok = models.load(cfg.model, cfg.cache_dir)
    src = cfg.data.eval.wikitext_sample
    ids = data.eval_tokens(src, tok, cfg.eval.seqlen, cfg.eval.max_windows)
    n = min(len(ids) // cfg.eval.seqlen, cfg.eval.max_windows)
    windows = ids[: n * cfg.eval.seqlen].view(n, cfg.eval.seqlen)
    return cfg, model, tok, windows


def merged(model: nn.Module, targets: list[str], spec: QuantSpec) -> nn.Module:
    """A copy of ``model`` whose targets are RTN :class:`QuantLinear` layers (``method=rtn``)."""
    import copy

    out = copy.deepcopy(model)
    for name, lin in models.targets(out, targets).items():
        models.set_module(out, name, QuantLinear(rtn(lin.weight.detach(), spec), lin.bias))
    return out


@torch.no_grad()
def hf_logits(model: nn.Module, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0].double()


def compare(got: torch.Tensor, want: torch.Tensor) -> dict:
    return {"max_abs_logit_diff": float((got - want).abs().max()),
            "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).double().mean())}


def env() -> dict:
    def v(p: str) -> str | None:
        try:
            return version(p)
        except PackageNotFoundError:
            return None

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"command": COMMAND, "cpu": cpu, "cpus": os.cpu_count(),
            "versions": {p: v(p) for p in ("torch", "transformers", "gptqmodel", "llama_cpp_python", "gguf")}}


def gptqmodel_check(cfg, model, tok, windows, work: Path, max_windows: int, ppl_grids: list[str]) -> dict:
    """GPTQModel loads ``gptq/`` at every grid; weights, logits and perplexity against qexp."""
    engines.require("gptqmodel")
    probe = windows[0, :64].tolist()
    out = {}
    for bits in (2, 3, 4, 8):
        for sym in (False, True):
            key = f"w{bits}g{GROUP}_{'sym' if sym else 'asym'}"
            m = merged(model, list(cfg.model.targets), QuantSpec(bits, GROUP, sym))
            report = export_model(m, tok, work / key, ["gptq"], list(cfg.model.targets), "float16", verify=False)
            d = work / key / "gptq"
            g = engines.gptqmodel_load(d, torch.float16)
            ours = load(d, exact=False, dtype=torch.float16)  # what the format holds, as qexp reads it
            wg = engines.gptqmodel_weights(g)
            w_equal = all(torch.equal(w, ours.get_submodule(n).weight_fp().half().float()) for n, w in wg.items())
            want = hf_logits(m, probe)
            r = {"layers": len(wg), "weights_equal_qexp_reload_fp16": w_equal,
                 "logits_vs_merged": compare(hf_logits(g, probe), want),
                 "qexp_fp16_reload_logits_vs_merged": compare(hf_logits(ours, probe), want),
                 "rounding": report["formats"]["gptq"]["rounding"], "sym_in_config": report["formats"]["gptq"]["sym"]}
            if key in ppl_grids:  # float16 on CPU is slow: perplexity on the grids asked for
                r |= {"ppl_gptqmodel": perplexity(g, windows, windows.shape[1], max_windows)["ppl"],
                      "ppl_qexp_merged": perplexity(m, windows, windows.shape[1], max_windows)["ppl"],
                      "ppl_windows": min(max_windows, len(windows))}
            out[key] = r
            _engines_into(work / key / "report.json", "gptqmodel", r)
            log.info("gptqmodel %s: %s", key, json.dumps({k: r[k] for k in list(r)[:6]}))
            del g, ours, m
    return out


def llamacpp_check(cfg, model, tok, windows, work: Path, threads: list[int], rounds: int, n_decode: int) -> dict:
    """llama.cpp loads Q4_1, Q8_0 and F16 GGUFs: logits and perplexity against qexp, decode tokens/s."""
    engines.require("llama_cpp")
    probe, targets = windows[0, :64].tolist(), list(cfg.model.targets)
    pre = gguf_file.gguf.GGUFReader(str(models.gguf_path(cfg.model))).get_field("tokenizer.ggml.pre").contents()
    files, out = {}, {"files": {}}
    for key, spec in (("Q4_1", QuantSpec(4, GROUP, False)), ("Q8_0", QuantSpec(8, GROUP, True))):
        m = merged(model, targets, spec)
        report = export_model(m, tok, work / key, ["gguf"], targets, tokenizer_pre=pre)
        files[key] = work / key / "gguf" / gguf_file.FILE
        r = _llama_quality(files[key], m, probe, windows)
        r |= {"grid": f"bits={spec.bits} group_size={GROUP} symmetric={spec.symmetric}",
              "rounding": report["formats"]["gguf"]["rounding"], "bytes": files[key].stat().st_size,
              "transformers_gguf_loader_vs_merged": report["formats"]["gguf"]["verify"]}
        out["files"][key] = r
        _engines_into(work / key / "report.json", "llama.cpp", r)
        if key == "Q4_1":  # the F16 GGUF of the same merged model: its dequantized weights
            dense = {n: q.weight_fp() for n, q in m.named_modules() if isinstance(q, QuantLinear)}
            files["F16"] = work / "F16" / gguf_file.FILE
            gguf_file.write(files["F16"].parent, m, tok, dense, float_state(m, set(dense), torch.float32), pre)
            out["files"]["F16"] = _llama_quality(files["F16"], m, probe, windows) | {
                "grid": "the 4-bit merged model dequantized, F16", "bytes": files["F16"].stat().st_size}
        del m
    prompt = windows[0, :16].tolist()
    out["decode"] = {"prompt_tokens": len(prompt), "decoded_tokens": n_decode, "rounds": rounds, "threads": {}}
    for t in threads:
        llms = {k: engines.llamacpp_load(f, n_ctx=256, n_threads=t, logits_all=False) for k, f in files.items()}
        runs = {k: [] for k in files}
        for _ in range(rounds):  # interleaved: the machine's load hits every file alike
            for k, llm in llms.items():
                d = engines.llamacpp_decode(llm, prompt, n_decode)
                runs[k].append(d["decode_tokens_per_s"])
        med = {k: statistics.median(v) for k, v in runs.items()}
        out["decode"]["threads"][str(t)] = {"tokens_per_s_median": med, "tokens_per_s_runs": runs,
                                            "speedup_Q4_1_vs_F16": med["Q4_1"] / med["F16"],
                                            "speedup_Q8_0_vs_F16": med["Q8_0"] / med["F16"]}
        log.info("llama.cpp decode, %d threads: %s", t, med)
        del llms
    return out


def _llama_quality(file: Path, m: nn.Module, probe: list[int], windows: torch.Tensor) -> dict:
    llm = engines.llamacpp_load(file, n_ctx=windows.shape[1], n_threads=2)
    r = {"logits_vs_merged": compare(torch.from_numpy(engines.llamacpp_logits(llm, probe)), hf_logits(m, probe)),
         "ppl_llamacpp": engines.llamacpp_perplexity(llm, windows)["ppl"],
         "ppl_qexp_merged": perplexity(m, windows, windows.shape[1])["ppl"], "ppl_windows": len(windows)}
    log.info("llama.cpp %s: %s", file.parent.name, r)
    return r


def _engines_into(path: Path, engine: str, r: dict) -> None:
    report = json.loads(path.read_text())
    report.setdefault("engines", {})[engine] = r
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    p.add_argument("--engines", nargs="+", default=["gptqmodel", "llamacpp"], choices=["gptqmodel", "llamacpp"])
    p.add_argument("--out", default="results/deploy", help="where the JSON results go")
    p.add_argument("--work", default=None, help="where the exports go (default: a temporary directory)")
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--gptq-ppl-windows", type=int, default=1, help="GPTQModel perplexity windows (fp16 on CPU)")
    p.add_argument("--gptq-ppl-grids", nargs="*", default=["w4g64_asym"])
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(max(a.threads))
    cfg, model, tok, windows = setup()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qexp-deploy-") as tmp:
        work = Path(a.work or tmp)
        for engine in a.engines:
            rec = env() | {"model": cfg.model.name, "method": "rtn (min-max)", "group_size": GROUP,
                           "probe_tokens": 64, "seqlen": int(windows.shape[1]), "argv": sys.argv[1:]}
            try:
                if engine == "gptqmodel":
                    rec["results"] = gptqmodel_check(cfg, model, tok, windows, work / engine, a.gptq_ppl_windows,
                                                     a.gptq_ppl_grids)
                else:
                    rec["results"] = llamacpp_check(cfg, model, tok, windows, work / engine, a.threads, a.rounds,
                                                    a.decode_tokens)
            except EngineMissing as e:
                rec["missing"] = str(e)
                log.error("%s", e)
            (out / f"{engine}.json").write_text(json.dumps(rec, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
