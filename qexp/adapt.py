"""Attach a method to a model's target linears, and merge them into their deployed form."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from . import dist
from .config import smoothquant_alpha
from .methods import Method, MethodLayer
from .models import set_module
from .quant import QuantLinear, act
from .quant.base import base_quantizer
from .quant.smoothquant import smooth


def attach(model: nn.Module, method: Method, targets: dict[str, nn.Linear], quant_cfg,
           calib: Callable[[], Tensor], cache_dir: Path | None = None) -> dict:
    """Quantize each target with the base quantizer (if the method starts from one) and swap in
    the method's training layer; ``targets`` is consumed (each fp Linear is freed as it is replaced).
    Everything else in the model stays frozen. ``cache_dir``: where
    GPTQ bases and MagR weights are cached across cells (None: no cache).

    On several processes the main process quantizes first (the others then read its GPTQ base
    from the cache), and at the end every rank takes the main process's attached model: one
    base and one calibrated init (QWHA, CLoQ) for all ranks.

    Weight-activation-KV quantization (``quant.smoothquant`` first, on the fp model;
    ``quant.act_bits`` / ``kv_bits`` last, on the method's layers): returns what the record states."""
    model.requires_grad_(False)
    names = list(targets)  # consumed below
    smoothed = None
    if smoothquant_alpha(getattr(quant_cfg, "smoothquant", False)) is not None:
        smoothed = smooth(model, calib(), smoothquant_alpha(quant_cfg.smoothquant))
    method.prepare(model, targets, calib() if method.NEEDS_CALIB else None)
    with dist.main_first():
        quantize = (base_quantizer(quant_cfg, method.spec, model, targets, calib, cache_dir)
                    if method.NEEDS_BASE else None)
    while targets:  # consumed: each fp Linear is freed once its method layer replaces it
        name, linear = next(iter(targets.items()))
        del targets[name]
        qw = quantize(name, linear) if quantize else None
        set_module(model, name, method.layer(name, linear, qw))
    dist.broadcast_module(model)
    report = act.install(model, names, getattr(quant_cfg, "act_bits", 16), getattr(quant_cfg, "kv_bits", 16))
    return {**report, "smoothquant": smoothed or "none"}


@torch.no_grad()
def merge(model: nn.Module, probe: Tensor) -> dict:
    """Replace every method layer by its ``merge()``; report whether the result is integer and
    how far the merged logits are from the training forward's on ``probe`` token ids.

    Both forwards run in the model's dtype and their logits are compared as they are (bf16 logits
    as bf16): ``lossless`` claims equality in that dtype, nothing finer or coarser."""
    before = model(input_ids=probe).logits
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MethodLayer)]
    counts: dict[str, int] = {}  # a layer may count what its merge changed (LoTA: codes raised / lowered)
    for name, layer in layers:
        for k, v in (layer.merge_counts() if hasattr(layer, "merge_counts") else {}).items():
            counts[k] = counts.get(k, 0) + v
        set_module(model, name, layer.merge())
    after = model(input_ids=probe).logits
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    diff = float((before.float() - after.float()).abs().max())
    on_grid = bool(quant) and all(getattr(type(m), "ON_GRID", True) for _, m in layers)
    # a layer class may name its deployed form (QWHA: "integer base + fp adapter")
    labels = sorted({getattr(type(m), "DEPLOYED", "") for _, m in layers} - {""})
    return {
        "on_grid": on_grid,  # every adapted layer ships as integer codes + scale + zero
        "lossless": on_grid and torch.equal(before, after),  # merged == training-forward logits, bit for bit
        "max_abs_logit_diff": diff,
        "logits_dtype": str(before.dtype).removeprefix("torch."),  # the dtype both were compared in
        "merged_layers": len(layers),
        "quant_layers": len(quant),
        "float_zero_points": any(not m.qweight.integer_zero for m in quant),
        "deployed": "integer" if on_grid else (" / ".join(labels) or ("integer (re-quantized)" if quant else "float")),
        **counts,
    }
