"""Inference engines that load qexp's exports on CPU: GPTQModel (``gptq/``, its torch kernel) and
llama.cpp through ``llama-cpp-python`` (``gguf/``). Both are optional; a missing one is a clear
error with the install command. ``scripts/deploy_check.py`` uses these to measure the exports."""

from __future__ import annotations

import importlib
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .common import ExportError

INSTALL = {
    "llama_cpp": "pip install 'qexp[deploy]'  (llama-cpp-python builds llama.cpp from source with cmake, minutes)",
    "gptqmodel": "pip install --no-deps gptqmodel pypcre logbar device-smi tokenicer defuser  (gptqmodel pins "
                 "torch>=2.14.1: install it --no-deps, or in its own venv; see README 'Export')",
    "peft": "pip install 'qexp[deploy]'  (or pip install peft)",
}


class EngineMissing(ExportError):
    """An optional inference engine is not installed; the message says how to install it."""


def require(module: str):
    """Import an optional engine, or fail with the command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise EngineMissing(f"{module} is not installed ({e}); install it with: {INSTALL[module]}") from None


# --- GPTQModel ----------------------------------------------------------------------------------

def gptqmodel_load(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A GPTQ checkpoint loaded by GPTQModel on CPU with its torch kernel (``BACKEND.TORCH``, which
    computes in float16 or bfloat16 only), run eagerly (``TORCHDYNAMO_DISABLE=1`` unless set)."""
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # the kernel eager: torch.compile on CPU recompiles per shape
    g = require("gptqmodel")
    return g.GPTQModel.load(str(path), device="cpu", backend=g.BACKEND.TORCH, dtype=dtype).model.eval()


def gptqmodel_weights(model: nn.Module) -> dict[str, Tensor]:
    """Each quantized linear's weight ``[d_out, d_in]`` as GPTQModel's kernel dequantizes it."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return {n: m.dequantize_weight().T.float() for n, m in model.named_modules() if isinstance(m, BaseQuantLinear)}


# --- llama.cpp ----------------------------------------------------------------------------------

def llamacpp_load(file: str | Path, n_ctx: int = 512, n_threads: int = 1, logits_all: bool = True):
    """A GGUF file in llama.cpp (CPU), ``n_ctx`` tokens of context, ``n_threads`` threads."""
    llama_cpp = require("llama_cpp")
    return llama_cpp.Llama(str(file), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=n_threads,
                           n_threads_batch=n_threads, logits_all=logits_all, n_gpu_layers=0, verbose=False)


def llamacpp_logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits ``[len(ids), vocab]`` for token ids fed as they are (no BOS added)."""
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def llamacpp_perplexity(llm, windows: Tensor) -> dict:
    """Token-level perplexity over ``windows [n, seqlen]`` as :func:`qexp.eval.perplexity` counts it
    (every window scored alone, ``seqlen - 1`` predicted tokens each)."""
    total, count = 0.0, 0
    for w in windows.tolist():
        z = llamacpp_logits(llm, w)[:-1]
        lse = z.max(-1) + np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1))
        total += float((lse - z[np.arange(len(w) - 1), w[1:]]).sum())
        count += len(w) - 1
    return {"ppl": math.exp(total / count), "nll": total / count, "windows": len(windows), "tokens": count}


def llamacpp_decode(llm, prompt: list[int], n: int) -> dict:
    """Greedy decode of ``n`` tokens after ``prompt``: tokens/s of the decode steps alone
    (the prompt and first token are timed apart)."""
    llm.reset()
    gen = llm.generate(list(prompt), top_k=1, temp=0.0, reset=True)
    t0 = time.perf_counter()
    out = [next(gen)]
    t1 = time.perf_counter()
    for _ in range(n):
        out.append(next(gen))
    t2 = time.perf_counter()
    return {"decode_tokens_per_s": n / (t2 - t1), "prompt_and_first_token_s": t1 - t0, "tokens": out}
