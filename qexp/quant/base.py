"""The base quantizer: how each frozen target weight becomes a ``QuantWeight`` before adaptation."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import Tensor, nn

from ..config import QuantConfig
from .grid import QuantSpec, QuantWeight
from .rtn import rtn

BaseQuantizer = Callable[[str, nn.Linear], QuantWeight]
log = logging.getLogger(__name__)


def base_quantizer(cfg: QuantConfig, spec: QuantSpec, model: nn.Module, targets: dict[str, nn.Linear],
                   calib: Callable[[], Tensor], cache_dir: Path | None = None) -> BaseQuantizer:
    """The base's stages: preprocess (none | MagR, ``quant.magr`` | AWQ, ``quant.awq``), then range and
    round (``quant.init``: RTN with a min-max / Lp / ICQ range, GPTQ, OmniQuant's learned clipping, or
    EfficientQAT's Block-AP); or read it from a GPTQ checkpoint (``quant.init=checkpoint``,
    ``quant.path``: no preprocessing, no rounding); ``calib()`` gives calibration token ids.

    GPTQ results and MagR weights are kept in ``cache_dir`` (when given) and reused by any later cell
    with the same weights, calibration ids, settings and code (:func:`.gptq.gptq_quantizer`,
    :func:`.magr.magr_cached`: MagR's at any bit width).
    MagR and AWQ's clipping change only what the rounding sees: the method still gets the fp
    ``linear`` (AWQ's channel scaling is folded into the model itself, an equivalent fp model)."""
    if cfg.init not in ("rtn", "gptq", "omniquant", "blockap", "checkpoint"):
        raise ValueError(f"quant.init={cfg.init!r}: choose 'rtn', 'gptq', 'omniquant', 'blockap' or 'checkpoint'")
    if cfg.init == "checkpoint":  # source: an existing GPTQ checkpoint
        from .checkpoint import checkpoint_quantizer

        return checkpoint_quantizer(getattr(cfg, "path", None), spec, targets)
    magr, awq = getattr(cfg, "magr", False), getattr(cfg, "awq", False)  # hand-built configs may not name them
    if magr and awq:
        raise ValueError("quant.magr=true and quant.awq=true: choose one preprocessing stage")
    if cfg.range == "icq" and cfg.init != "rtn":
        raise ValueError(f"quant.range=icq is a range of the RTN base; quant.init={cfg.init!r} (use quant.init=rtn)")
    pre: dict[str, Tensor] = {}
    if magr:
        if not cfg.magr_alpha > 0 or cfg.magr_iters < 1:
            raise ValueError(f"quant.magr_alpha={cfg.magr_alpha}, quant.magr_iters={cfg.magr_iters}: "
                             "need magr_alpha > 0 and magr_iters >= 1")
        from .magr import magr_cached

        pre = magr_cached(spec, model, targets, calib(), cfg.magr_alpha, cfg.magr_iters, cache_dir)
    if awq:
        from .awq import awq_weights

        pre, report = awq_weights(spec, model, targets, calib(), cfg.awq_grid, cfg.awq_tokens)
        log.info("AWQ: %s", report)
    if cfg.init == "rtn":
        if cfg.range == "icq":
            from .icq import icq

            return lambda name, lin: icq(pre.pop(name) if name in pre else lin.weight.detach(), spec)
        return lambda name, lin: rtn(pre.pop(name) if name in pre else lin.weight.detach(), spec, cfg.range,
                                     cfg.p, cfg.grid)
    with _rounding_sees(targets, pre):  # GPTQ / OmniQuant / Block-AP round the preprocessed weights
        if cfg.init == "gptq":
            from .gptq import gptq_quantizer

            return gptq_quantizer(cfg, spec, model, targets, calib(), cache_dir)
        results = reconstructed(cfg, spec, model, targets, calib())

    def quantize(name: str, linear: nn.Linear) -> QuantWeight:
        if name not in results:
            raise KeyError(f"quant.init={cfg.init} has no result for {name!r}; quantized: {', '.join(results)}")
        return results[name]

    return quantize


def reconstructed(cfg: QuantConfig, spec: QuantSpec, model: nn.Module, targets: dict[str, nn.Linear],
                  calib_ids: Tensor) -> dict[str, QuantWeight]:
    """OmniQuant (LWC) or Block-AP results, trained block by block on ``quant.recon.samples`` sequences."""
    r = cfg.recon
    ids = calib_ids[: r.samples] if r.samples > 0 else calib_ids
    stats: list = []
    if cfg.init == "omniquant":
        from .omniquant import omniquant_results

        results = omniquant_results(spec, model, targets, ids, r.epochs, r.batch, r.lr, log=stats)
    else:
        from .blockap import blockap_results

        results = blockap_results(spec, model, targets, ids, r.epochs, r.batch, r.lr, r.weight_lr, log=stats)
    if stats:
        log.info("%s: block output error (MSE) first %.3g, last %.3g over %d blocks", cfg.init, stats[0]["error"],
                 stats[-1]["error"], len(stats))
    return results


@contextmanager
def _rounding_sees(targets: dict[str, nn.Linear], pre: dict[str, Tensor]) -> Iterator[None]:
    """The preprocessed weights in the targets while a calibrated rounding runs; the model keeps its own."""
    saved = {n: targets[n].weight.data for n in pre}
    try:
        for n, w in pre.items():
            targets[n].weight.data = w
        yield
    finally:
        for n, w in saved.items():
            targets[n].weight.data = w
