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
    """RTN (optionally with a range search) or GPTQ; ``calib()`` gives calibration token ids.

    GPTQ results are kept in ``cache_dir`` (when given) and reused by any later cell with the
    same weights, calibration ids, settings and GPTQ code (see :func:`.gptq.gptq_quantizer`)."""
    if cfg.init == "rtn":
        return lambda name, lin: rtn(lin.weight.detach(), spec, cfg.range, cfg.p, cfg.grid)
    if cfg.init == "gptq":
        from .gptq import gptq_quantizer

        return gptq_quantizer(cfg, spec, model, targets, calib(), cache_dir)
    raise ValueError(f"quant.init={cfg.init!r}: choose 'rtn' or 'gptq'")
