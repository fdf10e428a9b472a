"""What every packed format shares: unsigned codes, integer zero points, and the weight error
that storing scales / zero points in a format's dtypes causes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..quant import QuantSpec, QuantWeight, dequantize


class ExportError(ValueError):
    """An export that cannot be written as asked; the message says why and what to do."""


def unsigned(qw: QuantWeight) -> tuple[Tensor, Tensor]:
    """Codes in ``[0, 2^b-1]`` and the matching float zero: ``(c - z) = (u - z_u)`` exactly.

    Signed symmetric codes (LR-QAT, L4Q) shift by ``2^(b-1)``: ``u = c + 2^(b-1)``,
    ``z_u = z + 2^(b-1)``; unsigned codes are unchanged."""
    shift = -qw.spec.qmin
    return qw.codes.to(torch.int64) + shift, qw.zero.float() + shift


def integer_zeros(z_u: Tensor, bits: int) -> tuple[Tensor, int]:
    """Round float zeros to the nearest integer in ``[0, 2^b-1]`` (what int zero-point formats
    hold); also returns how many groups had to be clamped into that range."""
    r = torch.round(z_u)
    clamped = int(((r < 0) | (r > 2**bits - 1)).sum())
    return r.clamp(0, 2**bits - 1).to(torch.int64), clamped


def signed_back(u: Tensor, scale: Tensor, z_u: Tensor, spec: QuantSpec) -> QuantWeight:
    """The :class:`QuantWeight` in ``spec``'s own code range from unsigned codes and zeros."""
    shift = -spec.qmin
    return QuantWeight(u - shift, scale, z_u.to(scale.dtype) - shift, spec)


@dataclass
class WeightError:
    """max |ΔW| and relative Frobenius error ‖ΔW‖/‖W‖, accumulated over layers."""

    max_abs: float = 0.0
    sq_err: float = 0.0
    sq_ref: float = 0.0
    layers_changed: int = 0

    def add(self, ref: QuantWeight, new: QuantWeight) -> None:
        w = _exact(ref)
        d = _exact(new) - w
        self.max_abs = max(self.max_abs, float(d.abs().max()))
        self.sq_err += float((d * d).sum())
        self.sq_ref += float((w * w).sum())
        self.layers_changed += bool(d.abs().max() > 0)

    def summary(self) -> dict:
        rel = math.sqrt(self.sq_err / self.sq_ref) if self.sq_ref else 0.0
        return {"max_abs_dW": self.max_abs, "rel_fro_dW": rel, "layers_changed": self.layers_changed}


def _exact(qw: QuantWeight) -> Tensor:
    return dequantize(qw.codes.double(), qw.scale.double(), qw.zero.double(), qw.spec.group_size)
