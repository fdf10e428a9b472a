"""GPTQ post-training quantization as its own cell name (``method=gptq``).

The same no-training PTQ method as ``rtn``; ``conf/method/gptq.yaml`` sets ``quant.init: gptq``
so the base quantizer is GPTQ (:mod:`qexp.quant.gptq`) and records say ``gptq``.
``method=rtn quant.init=gptq`` runs the identical computation under the name ``rtn``.
"""

from __future__ import annotations

from . import register
from .rtn import PTQ


@register
class GPTQ(PTQ):
    """GPTQ codes, scales and zeros as the final model (no training)."""

    name = "gptq"
