"""OmniQuant (weight-only) and AWQ as post-training cells of their own name (``method=omniquant``,
``method=awq``): the base quantizer's output as the final model, no training.

Both are stages of the base (``quant.init=omniquant``, ``quant.awq=true``; :mod:`qexp.quant.omniquant`,
:mod:`qexp.quant.awq`) that any trainable method can start from; ``conf/method/omniquant.yaml`` and
``conf/method/awq.yaml`` turn them on, so the records say which PTQ method made the model.
"""

from __future__ import annotations

from typing import ClassVar

from . import register
from .rtn import PTQ


@register
class OmniQuant(PTQ):
    """OmniQuant's learnable weight clipping, trained block by block (``quant.init=omniquant``)."""

    name = "omniquant"
    BASE: ClassVar[dict] = {"init": "omniquant"}  # refused on any other base (qexp.config.validate)


@register
class AWQ(PTQ):
    """AWQ's activation-aware channel scaling and clip search, then RTN (``quant.awq=true``)."""

    name = "awq"
    BASE: ClassVar[dict] = {"awq": True}
