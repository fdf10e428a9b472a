"""Uniform integer grids: the one place where codes, scales and zeros meet.

Every layer in qexp, during training and after merge, turns integer-valued codes into a
weight with :func:`dequantize`, ``W = (codes - zero) * scale`` per group of ``group_size``
consecutive input columns. Training forwards feed it float tensors that hold exact
integers (through :func:`ste_round`); merged layers feed it the stored integer codes. Same
function, same operands, same order: a merge that stores what training computed is
bit-exact by construction.

Layout: weights are ``[d_out, d_in]`` (PyTorch ``nn.Linear``); ``scale`` and ``zero`` are
``[d_out, n_groups]`` with ``n_groups = d_in // group_size`` (``group_size=-1``: one group
per output channel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class QuantSpec:
    """Which grid: bit width, group size along d_in (-1 = per channel), signed or not.

    Symmetric grids hold signed codes in ``[-2^(b-1), 2^(b-1)-1]`` with zero 0 (LR-QAT, L4Q);
    asymmetric grids hold unsigned codes in ``[0, 2^b-1]`` with a zero point (GPTQ, LoTA).
    """

    bits: int
    group_size: int = -1
    symmetric: bool = False

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def groups(self, d_in: int) -> int:
        """Number of groups along ``d_in``; raises if ``group_size`` does not divide it."""
        g = d_in if self.group_size == -1 else self.group_size
        if g <= 0 or d_in % g:
            raise ValueError(f"group_size={self.group_size} does not divide d_in={d_in}")
        return d_in // g

    def group_len(self, d_in: int) -> int:
        return d_in if self.group_size == -1 else self.group_size


def grouped(w: Tensor, group_size: int) -> Tensor:
    """View ``[d_out, d_in]`` as ``[d_out, n_groups, g]``."""
    d_out, d_in = w.shape
    g = d_in if group_size == -1 else group_size
    return w.reshape(d_out, d_in // g, g)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """``(codes - zero) * scale`` per group; the single dequantization used everywhere.

    ``codes`` is an exactly-integer float tensor or the stored integer tensor itself, which is
    promoted exactly to the float type (no separate converted copy). When no gradient is taken,
    the product is formed in place on the one new tensor: same operations, same bits, one
    full-size allocation instead of three (on CPU each fresh tensor costs page faults).
    """
    g, z, s = grouped(codes, group_size), zero.unsqueeze(-1), scale.unsqueeze(-1)
    if not codes.is_floating_point():
        dt = torch.promote_types(scale.dtype, zero.dtype)  # what codes.to(scale.dtype) - zero gives
        g = g if zero.dtype == dt else g.to(dt)
    w = g - z
    grad = torch.is_grad_enabled() and (codes.requires_grad or scale.requires_grad or zero.requires_grad)
    if grad or torch.result_type(w, s) != w.dtype:
        w = w * s
    else:
        w.mul_(s)
    return w.reshape(codes.shape)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g


def ste_round(x: Tensor) -> Tensor:
    """Round to nearest (ties to even) with an identity gradient."""
    return _RoundSTE.apply(x)


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """Codes ``clamp(round(w / scale) + zero, qmin, qmax)`` as a float tensor of integers."""
    q = torch.round(grouped(w, spec.group_size) / scale.unsqueeze(-1)) + zero.unsqueeze(-1)
    return q.clamp(spec.qmin, spec.qmax).reshape(w.shape)


@dataclass
class QuantWeight:
    """The common integer representation every method merges into.

    ``codes`` are integers in ``[spec.qmin, spec.qmax]`` (int8, or int16 for 8-bit unsigned);
    ``scale`` and ``zero`` are float ``[d_out, n_groups]``. ``zero`` may be fractional (LoTA's
    offset factor, L4Q's offset, QA-LoRA): ``integer_zero`` says whether it is an integer grid
    point, which decides what export formats can hold it losslessly.
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor
    spec: QuantSpec

    def __post_init__(self) -> None:
        d_out, d_in = self.codes.shape
        shape = (d_out, self.spec.groups(d_in))
        if tuple(self.scale.shape) != shape or tuple(self.zero.shape) != shape:
            raise ValueError(
                f"scale {tuple(self.scale.shape)} / zero {tuple(self.zero.shape)} must be {shape}"
            )
        lo, hi = int(self.codes.min()), int(self.codes.max())
        if lo < self.spec.qmin or hi > self.spec.qmax:
            raise ValueError(
                f"codes span [{lo}, {hi}], outside the {self.spec.bits}-bit grid "
                f"[{self.spec.qmin}, {self.spec.qmax}]"
            )
        dtype = torch.int8 if self.spec.qmax <= 127 else torch.int16
        self.codes = self.codes.to(dtype)

    @property
    def integer_zero(self) -> bool:
        return bool(torch.equal(self.zero, torch.round(self.zero)))

    def dequantize(self) -> Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.spec.group_size)
