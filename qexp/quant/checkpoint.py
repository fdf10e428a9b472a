"""The base from an existing GPTQ checkpoint (``quant.init=checkpoint quant.path=<dir>``).

Reads the codes, scales and zero points of every target from a GPTQ v1 (``checkpoint_format:
gptq``, AutoGPTQ; zeros stored minus one) or v2 (``gptq_v2``, GPTQModel and qexp's export)
checkpoint into :class:`QuantWeight`, so any method that starts from a base trains on it.
The grid must be one qexp holds: 2/3/4/8 bits, contiguous groups (no act-order ``g_idx``), the
configured ``bits`` / ``group_size``. The rest of the model comes from ``model.*`` as usual.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from ..config import ConfigError
from .grid import QuantSpec, QuantWeight

BITS = (2, 3, 4, 8)


def quant_config(path: Path) -> dict:
    """``quantization_config`` of ``config.json``, else ``quantize_config.json`` (AutoGPTQ)."""
    cfg = path / "config.json"
    qc = json.loads(cfg.read_text()).get("quantization_config") if cfg.exists() else None
    if qc is None and (path / "quantize_config.json").exists():
        qc = json.loads((path / "quantize_config.json").read_text())
    if qc is None:
        raise ConfigError(f"quant.path={str(path)!r} has no quantization_config (config.json) or quantize_config.json:"
                          " not a GPTQ checkpoint")
    return qc


def checkpoint_quantizer(path: str | None, spec: QuantSpec,
                         targets: dict[str, nn.Linear]) -> Callable[[str, nn.Linear], QuantWeight]:
    """Check the checkpoint against ``spec`` and ``targets`` (before any work) and return the
    base quantizer that hands out each target's :class:`QuantWeight`."""
    from ..export import gptq  # late: export imports quant
    from ..export.common import ExportError, signed_back

    if not path or not Path(path).is_dir():
        raise ConfigError(f"quant.init=checkpoint needs quant.path=<a GPTQ checkpoint directory>; got {path!r}")
    d = Path(path)
    qc = quant_config(d)
    method, fmt = qc.get("quant_method", "gptq"), qc.get("checkpoint_format", "gptq")
    bits, group = qc.get("bits"), qc.get("group_size", -1)
    if method != "gptq" or fmt not in ("gptq", "gptq_v2"):
        raise ConfigError(f"quant.path={path}: quant_method={method!r} checkpoint_format={fmt!r}; qexp imports GPTQ "
                          "checkpoints (checkpoint_format gptq or gptq_v2)")
    if bits not in BITS:
        raise ConfigError(f"quant.path={path}: the checkpoint has bits={bits}; qexp's grids hold {BITS}")
    if qc.get("desc_act"):
        raise ConfigError(f"quant.path={path}: desc_act=true (act-order g_idx); qexp's QuantWeight holds contiguous "
                          "groups only; requantize without act-order")
    if (bits, group) != (spec.bits, spec.group_size):
        raise ConfigError(f"quant.path={path}: the checkpoint has bits={bits} group_size={group}; this run has "
                          f"bits={spec.bits} group_size={spec.group_size}: set bits={bits} group_size={group}")
    tensors: dict = {}
    for f in sorted(d.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    missing = [n for n in targets if f"{n}.qweight" not in tensors]
    if missing:
        raise ConfigError(f"quant.path={path}: no GPTQ tensors for {len(missing)} targets, e.g. {missing[:3]}")
    out = {}
    for name, lin in targets.items():
        try:
            u, scale, z, _ = gptq.read(tensors, name, bits)
        except ExportError as e:
            raise ConfigError(f"quant.path={path}: {e}") from None
        if fmt == "gptq":  # v1 stored zero - 1 (zero 0 wrapped to 2^b - 1)
            z = (z + 1) % 2**bits
        if tuple(u.shape) != tuple(lin.weight.shape):
            raise ConfigError(f"quant.path={path}: {name} is {tuple(u.shape)} in the checkpoint, "
                              f"{tuple(lin.weight.shape)} in the model")
        if spec.symmetric and not bool((z == 2 ** (bits - 1)).all()):
            raise ConfigError(f"quant.path={path}: {name} has zero points other than {2 ** (bits - 1)} (an "
                              "asymmetric grid); this run asks quant.sym=true")
        out[name] = signed_back(u, scale.float(), z.float(), spec)
    return lambda name, lin: out.pop(name)
