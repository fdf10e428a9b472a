"""LR-QAT (Bondarenko, Del Chiaro & Nagel, 2024): low-rank QAT inside the rounding.

``Ŵ = s · clamp(⌊Φ₀ + (α/r)·A·B⌉, q_min, q_max)`` (paper Eq. 8), with ``A [d_out, r]`` zero-init
and ``B [r, d_in]`` Kaiming-uniform (the spec's naming: ``C = (α/r)AB`` is in units of
quantization steps, 0 at init, so the initial model is RTN on the learned ranges), the scale
``s [d_out, n_groups]`` learned from ``s₀``, and ``Φ₀ = φ(W₀/s₀)`` frozen. ``φ`` (``phi``):

* ``int8`` (default, the paper's "Q4.4 / Q3.5"): ``INT8(⌊2^(8−b)·clamp(W₀/s₀)⌉)``, 8−b fractional bits;
* ``bf16`` / ``fp32``: a plain cast of ``clamp(W₀/s₀)``.

The fp ``W₀`` is not kept: only ``Φ₀``, ``A``, ``B``, ``s`` (and a frozen zero point) live in the
layer. The whole "Φ₀ + C → round → clamp → scale → matmul" sits in ``torch.utils.checkpoint``,
so ``Ŵ`` is recomputed in the backward pass instead of stored. ``s₀`` comes from the base
quantizer: ``conf/method/lrqat.yaml`` sets an Lp (p=4) range search on a symmetric grid.

Asymmetric path (the paper's INT2 rows, marked §; not in the released code): codes
``W_int = clamp(⌊Φ₀ + C⌉ + z, 0, 2^b−1)``, ``Ŵ = s·(W_int − z)``, ``z`` the integer zero point of
the initial (asymmetric Lp) range, frozen. ``asym`` switches it; by default it is on at 2 bits.
``Φ₀`` then stores ``W₀/s₀ + z − 2^(b−1)`` (the same signed range as the symmetric case, so the
int8 fixed point cannot overflow) and the codes add ``2^(b−1)`` back; since ``z`` is an
integer this equals the formula above.

Merge: the same code expression on the same operands, stored as a :class:`QuantLinear`; the
merged logits equal the training forward's bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..config import ConfigError
from ..quant import QuantLinear, QuantSpec, QuantWeight, act_linear, dequantize, grouped, ste_round
from . import register
from .base import Method, MethodConfig, MethodLayer
from .lora import lora_factors

PHI = ("int8", "bf16", "fp32")


@dataclass
class LRQATConfig(MethodConfig):
    rank: int = 32
    alpha: float = 1.0  # C = (alpha / rank) A B; the code's default 1 (LoRA's 16 would multiply the lr)
    phi: str = "int8"  # storage of Phi0: int8 fixed point (8-b fractional bits) | bf16 | fp32
    asym: bool | None = None  # asymmetric grid with frozen zero point; None: on at 2 bits, else quant.sym decides
    lr_ab: float | None = 1e-3  # lr of A and B (None: train.lr)
    lr_s: float = 1e-5  # lr of the scales (0: scales frozen)
    beta2: float = 0.95  # AdamW betas (0.9, beta2)
    checkpoint: bool = True  # recompute W-hat in the backward pass


def _codes(phi0: Tensor, frac_bits: int | None, offset: int, a: Tensor, b: Tensor, scaling: float,
           spec: QuantSpec) -> Tensor:
    """``clamp(⌊φ⁻¹(Φ₀) + offset + (α/r)AB⌉, q_min, q_max)`` as exact integers in float32 (STE).

    The frozen part and the product are formed in place on their fresh tensors (the same
    operations in the same order, so the same bits; four full-size allocations fewer per call).
    """
    base = phi0.float() if phi0.dtype != torch.float32 else phi0.clone()
    if frac_bits is not None:
        base.div_(2**frac_bits)
    base.add_(offset)
    c = (a.float() @ b.float()).mul_(scaling)
    return torch.clamp(ste_round(c.add_(base)), spec.qmin, spec.qmax)


def _forward(x: Tensor, phi0: Tensor, a: Tensor, b: Tensor, scale: Tensor, zero: Tensor, bias: Tensor | None,
             frac_bits: int | None, offset: int, scaling: float, spec: QuantSpec) -> Tensor:
    w = dequantize(_codes(phi0, frac_bits, offset, a, b, scaling, spec), scale, zero, spec.group_size)
    return act_linear(x, w, bias)


class LRQATLinear(MethodLayer):
    """The LR-QAT training layer; holds no fp copy of ``W₀``. ``A``, ``B`` in the model dtype
    (``--use-bf16-ab``; fp32 under fp16, :func:`param_dtype`), ``s`` fp32; ``C``, the codes and
    ``Ŵ`` in fp32, cast to the activation dtype for the matmul."""

    def __init__(self, weight: Tensor, bias: Tensor | None, qw: QuantWeight, rank: int, alpha: float,
                 phi: str = "int8", use_checkpoint: bool = True) -> None:
        super().__init__()
        spec = self.spec = qw.spec
        half = 2 ** (spec.bits - 1)
        self.offset = spec.qmin + half  # 0 on a signed grid, 2^(b-1) on an unsigned one
        self.frac_bits = 8 - spec.bits if phi == "int8" else None
        # Phi0 = W0/s0 (+ z - 2^(b-1) on an unsigned grid), clamped to the signed range [-2^(b-1), 2^(b-1)-1]
        x = grouped(weight.detach().float(), spec.group_size) / qw.scale.unsqueeze(-1)
        x = (x + (qw.zero - self.offset).unsqueeze(-1)).reshape(weight.shape).clamp(-half, half - 1)
        if phi == "int8":
            phi0 = torch.round(x * 2**self.frac_bits).to(torch.int8)
        else:
            phi0 = x.to(torch.bfloat16 if phi == "bf16" else torch.float32)
        self.register_buffer("phi0", phi0)
        self.register_buffer("zero", qw.zero.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.scale = nn.Parameter(qw.scale.detach().float().clone())
        b, a = lora_factors(weight.shape[1], weight.shape[0], rank, weight)  # B [r, d_in] Kaiming, A [d_out, r] 0
        self.lora_A, self.lora_B = a, b
        self.scaling = alpha / rank
        self.use_checkpoint = use_checkpoint

    def _args(self) -> tuple:
        return (self.phi0, self.lora_A, self.lora_B, self.scale, self.zero, self.bias, self.frac_bits,
                self.offset, self.scaling, self.spec)

    def codes(self) -> Tensor:
        """The current integer codes (what merge stores)."""
        with torch.no_grad():
            return _codes(self.phi0, self.frac_bits, self.offset, self.lora_A, self.lora_B, self.scaling, self.spec)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(_forward, x, *self._args(), use_reentrant=False)
        return _forward(x, *self._args())

    @torch.no_grad()
    def merge(self) -> nn.Module:
        return QuantLinear(QuantWeight(self.codes(), self.scale.detach(), self.zero, self.spec), self.bias)


@register
class LRQAT(Method):
    name = "lrqat"
    Config = LRQATConfig

    def __init__(self, cfg: LRQATConfig, spec: QuantSpec) -> None:
        if cfg.phi not in PHI:
            raise ConfigError(f"method.phi={cfg.phi!r} is not valid; choose one of: {', '.join(PHI)}")
        if cfg.rank <= 0:
            raise ConfigError(f"method.rank={cfg.rank} is not valid; use a positive integer")
        asym = (spec.bits == 2 or not spec.symmetric) if cfg.asym is None else cfg.asym
        # the base quantizer uses this spec, so s0 (and z) come from a range on the grid the layer trains on
        super().__init__(cfg, QuantSpec(spec.bits, spec.group_size, symmetric=not asym))

    def layer(self, name: str, linear: nn.Linear, qw: QuantWeight | None) -> nn.Module:
        c = self.cfg
        layer = LRQATLinear(linear.weight, linear.bias, qw, c.rank, c.alpha, c.phi, c.checkpoint)
        layer.scale.requires_grad_(c.lr_s > 0)
        return layer

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """A and B at ``lr_ab`` (default 1e-3), the scales at ``lr_s`` (1e-5); weight decay as configured."""
        layers = [m for m in model.modules() if isinstance(m, LRQATLinear)]
        ab = [p for m in layers for p in (m.lora_A, m.lora_B)]
        groups = [{"params": ab, "lr": self.cfg.lr_ab if self.cfg.lr_ab is not None else lr,
                   "weight_decay": weight_decay}]
        scales = [m.scale for m in layers if m.scale.requires_grad]
        if scales:
            groups.append({"params": scales, "lr": self.cfg.lr_s, "weight_decay": weight_decay})
        return groups

    def optimizer(self, model: nn.Module, lr: float, weight_decay: float, total_steps: int) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.param_groups(model, lr, weight_decay), lr=lr, betas=(0.9, self.cfg.beta2),
                                 weight_decay=weight_decay)
