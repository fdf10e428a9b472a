"""LSQ / LSQ+ quantizer math with a learned scale ``s`` and a learned float offset ``β``.

``W_q = s · ⌊clamp((W − β)/s, qmin, qmax)⌉ + β`` per group (LSQ+; ``β = 0`` is plain LSQ).
To keep merges bit-exact, the weight is always built through the shared
:func:`~qexp.quant.grid.dequantize` with the float zero point ``zero = −β/s``
(:func:`offset_zero`): ``(codes − zero) · s``. A merged ``QuantLinear`` stores the same codes,
``s`` and ``zero`` and so evaluates the same expression.

Gradients (STE through the round, clamp passes gradient only in range, ``M = 1[qmin ≤ w ≤ qmax]``
with ``w = (W − β)/s``): ``∂W_q/∂W = M``, ``∂W_q/∂s = w̃ − M·w`` (= ``w̃ − w`` in range, the clamp
bound outside), ``∂W_q/∂β = 1 − M``. :func:`lsq_fake_quant` gets them from autograd; L4Q's
memory-saving backward writes them out.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .grid import QuantSpec, dequantize, grouped, ste_round


def offset_zero(scale: Tensor, offset: Tensor) -> Tensor:
    """The float zero point ``−β/s`` that makes ``dequantize`` compute ``s·w̃ + β``."""
    return -offset / scale


def lsq_normalize(w: Tensor, scale: Tensor, offset: Tensor, group_size: int) -> Tensor:
    """``(W − β)/s`` per group, back in ``[d_out, d_in]`` layout (the division in place on the one
    new tensor when no gradient is taken: same bits, one full-size allocation instead of two)."""
    t = grouped(w, group_size) - offset.unsqueeze(-1)
    s = scale.unsqueeze(-1)
    grad = torch.is_grad_enabled() and (w.requires_grad or scale.requires_grad or offset.requires_grad)
    t = t / s if grad or torch.result_type(t, s) != t.dtype else t.div_(s)
    return t.reshape(w.shape)


def lsq_codes(w: Tensor, scale: Tensor, offset: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor, Tensor]:
    """``(w, w̃, M)``: the normalized weight, its codes ``⌊clamp(w)⌉`` (float integers) and the in-range mask."""
    wn = lsq_normalize(w, scale, offset, spec.group_size)
    codes = wn.clamp(spec.qmin, spec.qmax)
    mask = codes == wn  # qmin <= w <= qmax (one pass instead of three)
    return wn, codes.round_(), mask


def lsq_weight(codes: Tensor, scale: Tensor, offset: Tensor, group_size: int) -> Tensor:
    """``s·w̃ + β``, evaluated as the shared ``dequantize(w̃, s, −β/s)``."""
    return dequantize(codes, scale, offset_zero(scale, offset), group_size)


def lsq_fake_quant(w: Tensor, scale: Tensor, offset: Tensor, spec: QuantSpec) -> Tensor:
    """Differentiable LSQ+ fake quantization (STE round, clamp masks ``W``); value = :func:`lsq_weight`."""
    wn = lsq_normalize(w, scale, offset, spec.group_size)
    return lsq_weight(ste_round(wn.clamp(spec.qmin, spec.qmax)), scale, offset, spec.group_size)


def lsq_grad_scale(spec: QuantSpec, d_in: int) -> float:
    """LSQ's gradient scale ``1/√(N·Q_P)`` with ``N`` the weights per group (Esser et al. 2020)."""
    return 1.0 / math.sqrt(spec.group_len(d_in) * spec.qmax)


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, g: float) -> Tensor:
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.g, None


def grad_scale(x: Tensor, g: float) -> Tensor:
    """Identity in the forward (bit for bit), gradient times ``g`` in the backward."""
    return _GradScale.apply(x, g)
