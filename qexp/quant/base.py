"""The base quantizer: how each frozen target weight becomes a ``QuantWeight`` before adaptation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import Tensor, nn

from ..config import QuantConfig
from .grid import QuantSpec, QuantWeight
from .rtn import rtn

BaseQuantizer = Callable[[str, nn.Linear], QuantWeight]


def base_quantizer(cfg: QuantConfig, spec: QuantSpec, model: nn.Module, targets: dict[str, nn.Linear],
                   calib: Callable[[], Tensor], cache_dir: Path | None = None) -> BaseQuantizer:
    """The base's stages: preprocess (none | MagR, ``quant.magr``), then round (RTN, optionally with a
    range search, or GPTQ; ``quant.init``); or read it from a GPTQ checkpoint (``quant.init=checkpoint``,
    ``quant.path``); ``calib()`` gives calibration token ids.

    GPTQ results are kept in ``cache_dir`` (when given) and reused by any later cell with the
    same weights, calibration ids, settings and GPTQ code (see :func:`.gptq.gptq_quantizer`).
    MagR changes only what the rounding sees: the method still gets the original fp ``linear``."""
    if cfg.init not in ("rtn", "gptq", "checkpoint"):
        raise ValueError(f"quant.init={cfg.init!r}: choose 'rtn', 'gptq' or 'checkpoint'")
    if cfg.init == "checkpoint":  # source: an existing GPTQ checkpoint (no preprocessing, no rounding)
        from .checkpoint import checkpoint_quantizer

        return checkpoint_quantizer(getattr(cfg, "path", None), spec, targets)
    pre: dict[str, Tensor] = {}
    if getattr(cfg, "magr", False):  # configs built by hand (tests, bench) may not name it
        if not cfg.magr_alpha > 0 or cfg.magr_iters < 1:
            raise ValueError(f"quant.magr_alpha={cfg.magr_alpha}, quant.magr_iters={cfg.magr_iters}: "
                             "need magr_alpha > 0 and magr_iters >= 1")
        from .magr import magr_weights

        pre = magr_weights(spec, model, targets, calib(), cfg.magr_alpha, cfg.magr_iters)
    if cfg.init == "rtn":
        return lambda name, lin: rtn(pre.pop(name) if name in pre else lin.weight.detach(), spec, cfg.range,
                                     cfg.p, cfg.grid)
    from .gptq import gptq_quantizer

    saved = {n: targets[n].weight.data for n in pre}
    try:  # GPTQ rounds the MagR weights (its cache key hashes them), the model keeps its own
        for n, w in pre.items():
            targets[n].weight.data = w
        return gptq_quantizer(cfg, spec, model, targets, calib(), cache_dir)
    finally:
        for n, w in saved.items():
            targets[n].weight.data = w
