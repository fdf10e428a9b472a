"""EfficientQAT (Chen et al., 2024): Block-AP, then E2E-QP.

1. **Block-AP** (block-wise training of all parameters): each decoder block's weights, step sizes and
   zero points train to reproduce the fp block's output; the result is an integer base (codes,
   ``s``, integer ``z``). It is a stage of the base quantizer, ``quant.init=blockap``
   (:mod:`qexp.quant.blockap`), which ``conf/method/efficientqat.yaml`` sets.
2. **E2E-QP** (end-to-end training of the quantization parameters): the codes and zero points are
   frozen and only the step sizes ``s`` train, end to end on the task data: PEQA's layer.

The merge stores the frozen codes, the trained ``s`` and the integer ``z``: exactly the training
forward (lossless, an ordinary integer checkpoint).
"""

from __future__ import annotations

from typing import ClassVar

from . import register
from .base import MethodConfig
from .peqa import PEQA


@register
class EfficientQAT(PEQA):
    """E2E-QP (scales only) on the Block-AP base."""

    name = "efficientqat"
    Config = MethodConfig
    BASE: ClassVar[dict] = {"init": "blockap"}  # the base it needs (qexp.config.validate refuses others)
