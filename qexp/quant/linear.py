"""The deployed layer: integer codes + scale + zero, dequantized on the fly (or once for a whole
evaluation pass: :func:`dequantized_once`)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .grid import QuantSpec, QuantWeight, dequantize


class QuantLinear(nn.Module):
    """``y = x · dequantize(codes, scale, zero)ᵀ + bias``: what every on-grid method merges into."""

    def __init__(self, qw: QuantWeight, bias: Tensor | None = None) -> None:
        super().__init__()
        self.spec: QuantSpec = qw.spec
        self.out_features, self.in_features = qw.codes.shape
        self.register_buffer("codes", qw.codes)
        self.register_buffer("scale", qw.scale.detach().clone())
        self.register_buffer("zero", qw.zero.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def qweight(self) -> QuantWeight:
        return QuantWeight(self.codes, self.scale, self.zero, self.spec)

    def weight_fp(self) -> Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.spec.group_size)

    def forward(self, x: Tensor) -> Tensor:
        w = getattr(self, "_dequantized", None)  # set by dequantized_once (an evaluation pass)
        return act_linear(x, self.weight_fp() if w is None else w, self.bias)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"in={self.in_features}, out={self.out_features}, bits={s.bits}, "
                f"group_size={s.group_size}, symmetric={s.symmetric}")


def act_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x Wᵀ + b`` in the activation dtype: ``weight`` (dequantized in fp32 by the grid math) and
    ``bias`` are cast to ``x.dtype`` first (no-ops when they match). Training forwards and merged
    layers all end here, so a merge that stores the training forward's operands casts the same
    fp32 weight the same way: bit-exact in bf16 / fp16 as in fp32."""
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def fp_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """A plain frozen ``nn.Linear`` holding ``weight`` (for results that are not on the grid)."""
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    lin.requires_grad_(False)
    return lin


@contextmanager
def dequantized_once(model: nn.Module, dtype: torch.dtype | None = None):
    """Within the block every :class:`QuantLinear` of ``model`` uses its weight dequantized once,
    in ``dtype`` (default: the model's; ``act_linear`` casts to the activations' dtype anyway), instead
    of on every forward: the same numbers bit for bit, for the memory of one float copy of the
    weights. For evaluation passes of thousands of forwards (lm-eval); freed on exit."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    dtype = dtype or getattr(model, "dtype", None)
    try:
        with torch.no_grad():
            for m in layers:
                w = m.weight_fp()
                m._dequantized = w if dtype is None else w.to(dtype)
        yield model
    finally:
        for m in layers:
            m._dequantized = None
