"""L4Q (Jeon, Kim & Kim, arXiv 2402.04902): LoRA inside an LSQ+ quantizer, merged losslessly.

``W_q = s·⌊clamp((W₀ + α·B A − β)/s, Q_N, Q_P)⌉ + β`` on a symmetric signed grid, with a learned
per-group scale ``s`` and float offset ``β`` (methods.md §4). ``A`` (Kaiming-uniform), ``B`` (0),
``s`` and ``β`` train; ``W₀`` stays frozen in the model dtype. Init (L4Q_init, §4.3): per group
``s = max(|min W₀/Q_N|, |max W₀/Q_P|)`` (nothing clips) and ``β = 0``.

The layer runs through :class:`L4QFunction`, the paper's memory-saving autograd (§4.2): the
forward saves only ``x, W₀, A, B, s, β`` (no fake-quant weight, no weight gradient); the
backward recomputes ``w`` and the in-range mask ``M`` and forms ``G = (∂L/∂Y)ᵀ X`` transiently.
The weight is built by :func:`~qexp.quant.lsq.lsq_weight`, i.e. the shared ``dequantize`` with
zero ``−β/s``, and the merge stores those very operands: bit-exact, with a float zero point.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..quant import QuantLinear, QuantSpec, QuantWeight, act_linear, grouped, minmax_range
from ..quant.lsq import lsq_codes, lsq_grad_scale, lsq_weight, offset_zero
from . import register
from .base import Method, MethodConfig, MethodLayer, scale_dtype
from .lora import lora_factors


@dataclass
class L4QConfig(MethodConfig):
    rank: int = 4  # paper: 4 (8 for Mistral)
    alpha: float = 1.0  # W_comb = W₀ + alpha·BA (no 1/r); see conf/method/l4q.yaml for the choice
    lsq_grad_scale: bool = False  # LSQ's 1/√(g·Q_P) on ∂L/∂s and ∂L/∂β; the paper does not state it
    init: str = "l4q"  # s, β init (paper Table 4): l4q | lsq (LSQ+) | symm (absmax) | asymm (min-max)


INITS = ("l4q", "lsq", "symm", "asymm")


@torch.no_grad()
def init_range(w: Tensor, spec: QuantSpec, how: str = "l4q") -> tuple[Tensor, Tensor]:
    """Per-group ``(s, β)`` of L4Q's Table 4 (fp32): ``l4q`` L4Q_init, ``s = max(|min W|/|Q_N|, max W/Q_P)``,
    ``β = 0`` (nothing clips); ``symm`` ``s = max|W|/2^(b−1)``, ``β = 0`` (the positive end may clip);
    ``asymm`` min-max, ``s = (max − min)/(2^b − 1)``, ``β = min − s·Q_N``; ``lsq`` LSQ+'s weight init
    ``s = max(|μ − 3σ|, |μ + 3σ|)/2^(b−1)``, ``β = 0`` (clips the tails; β = 0 for weights: assumed)."""
    if how == "l4q":
        s, beta = minmax_range(w, spec)
        return s, beta
    g = grouped(w.detach().float(), spec.group_size)
    half = 2 ** (spec.bits - 1)
    if how == "symm":
        s = g.abs().amax(-1) / half
        beta = torch.zeros_like(s)
    elif how == "asymm":
        lo, hi = g.amin(-1), g.amax(-1)
        s = (hi - lo) / (2**spec.bits - 1)
        beta = lo - s * spec.qmin
    elif how == "lsq":
        mu, sigma = g.mean(-1), g.std(-1)
        s = torch.maximum((mu - 3 * sigma).abs(), (mu + 3 * sigma).abs()) / half
        beta = torch.zeros_like(s)
    else:
        raise ConfigError(f"method.init={how!r} is not valid; choose one of: {', '.join(INITS)}")
    return s.clamp(min=1e-8), beta


def combined_weight(w0: Tensor, a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """``W₀ + α·B A`` (one fused ``addmm``) in fp32, the quantizer's dtype, whatever the model dtype
    (so bf16 rounding of the sum never hides the update): the same expression in forward, backward
    and merge."""
    dt = scale_dtype(a.dtype)
    return torch.addmm(w0.to(dt), b.to(dt), a.to(dt), alpha=alpha)


def _group_sum(t: Tensor, group_size: int) -> Tensor:
    return grouped(t, group_size).sum(-1)


class L4QFunction(torch.autograd.Function):
    """``y = x W_qᵀ + bias`` with L4Q's gradients for ``x, A, B, s, β`` (``W₀`` and bias frozen)."""

    @staticmethod
    def forward(ctx, x: Tensor, w0: Tensor, a: Tensor, b: Tensor, s: Tensor, beta: Tensor, bias: Tensor | None,
                alpha: float, spec: QuantSpec, gscale: float) -> Tensor:
        _, codes, _ = lsq_codes(combined_weight(w0, a, b, alpha), s, beta, spec)
        w_q = lsq_weight(codes, s, beta, spec.group_size)
        ctx.save_for_backward(x, w0, a, b, s, beta)
        ctx.alpha, ctx.spec, ctx.gscale = alpha, spec, gscale
        return act_linear(x, w_q, bias)

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, w0, a, b, s, beta = ctx.saved_tensors
        alpha, spec = ctx.alpha, ctx.spec
        wn, codes, mask = lsq_codes(combined_weight(w0, a, b, alpha), s, beta, spec)
        gx = ga = gb = gs = gbeta = None
        if ctx.needs_input_grad[0]:
            gx = gy @ lsq_weight(codes, s, beta, spec.group_size).to(gy.dtype)
        if any(ctx.needs_input_grad[2:6]):
            # Full-size temporaries are reused in place once their last reader is done (same bits as
            # fresh products): G, then M⊙G in G's storage, G⊙w̃ in w̃'s, (M⊙G)⊙w in w's.
            g = gy.reshape(-1, gy.shape[-1]).T.to(a.dtype) @ x.reshape(-1, x.shape[-1]).to(a.dtype)  # G, transient
            gsum = partial(_group_sum, group_size=spec.group_size)
            sum_g = gsum(g) if ctx.needs_input_grad[5] else None
            g_codes = gsum(codes.mul_(g)) if ctx.needs_input_grad[4] else None
            gm = g.mul_(mask)  # M ⊙ G: no gradient through clipped entries
            del g
            if ctx.needs_input_grad[2]:
                ga = alpha * (b.T @ gm)
            if ctx.needs_input_grad[3]:
                gb = alpha * (gm @ a.T)
            if ctx.needs_input_grad[5]:  # Σ_group G ⊙ (1 − M) = Σ G − Σ M⊙G
                gbeta = (sum_g - gsum(gm)).to(beta.dtype) * ctx.gscale
            if ctx.needs_input_grad[4]:
                # Σ_group G ⊙ [M⊙(w̃ − w) + (1−M)⊙clamp(w)] = Σ G⊙w̃ − Σ (M⊙G)⊙w   (w̃ = clamp(w) off range)
                gs = (g_codes - gsum(wn.mul_(gm))).to(s.dtype) * ctx.gscale
            del gm
        return gx, None, ga, gb, gs, gbeta, None, None, None, None


class L4QLinear(MethodLayer):
    """A target linear under L4Q: frozen ``W₀`` (model dtype), trainable ``lora_A, lora_B`` (in
    :func:`param_dtype` of it) and fp32 ``scale, offset``; ``(W − β)/s`` and the weight in fp32."""

    def __init__(self, weight: Tensor, bias: Tensor | None, spec: QuantSpec, rank: int, alpha: float,
                 use_grad_scale: bool, init: str = "l4q") -> None:
        super().__init__()
        self.spec, self.alpha = spec, alpha
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.lora_A, self.lora_B = lora_factors(weight.shape[1], weight.shape[0], rank, weight)
        scale, offset = init_range(weight, spec, init)  # L4Q_init: symmetric, nothing clips, β = 0
        self.scale = nn.Parameter(scale.to(scale_dtype(weight.dtype)))
        self.offset = nn.Parameter(offset.to(scale_dtype(weight.dtype)))
        self.gscale = lsq_grad_scale(spec, weight.shape[1]) if use_grad_scale else 1.0

    def forward(self, x: Tensor) -> Tensor:
        return L4QFunction.apply(x, self.weight, self.lora_A, self.lora_B, self.scale, self.offset, self.bias,
                                 self.alpha, self.spec, self.gscale)

    @torch.no_grad()
    def quantized(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(w, w̃, M)`` of the current combined weight (what the forward rounds)."""
        return lsq_codes(combined_weight(self.weight, self.lora_A, self.lora_B, self.alpha), self.scale,
                         self.offset, self.spec)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Codes ``w̃``, scale ``s`` and float zero ``−β/s``: the training forward's own operands."""
        _, codes, _ = self.quantized()
        s = self.scale.detach()
        return QuantLinear(QuantWeight(codes, s, offset_zero(s, self.offset.detach()), self.spec), self.bias)


@register
class L4Q(Method):
    """L4Q: quantizes the fp weight itself (no base quantizer), LoRA + LSQ+ trained jointly."""

    name = "l4q"
    Config = L4QConfig
    NEEDS_BASE = False

    def __init__(self, cfg: L4QConfig, spec: QuantSpec) -> None:
        if not spec.symmetric:
            raise ConfigError("quant.sym=False is not valid for method=l4q: L4Q quantizes on a symmetric signed "
                              "grid with a learned offset; choose quant.sym=true (conf/method/l4q.yaml sets it)")
        if cfg.rank < 1:
            raise ConfigError(f"method.rank={cfg.rank} is not valid; choose a positive integer")
        if cfg.init not in INITS:
            raise ConfigError(f"method.init={cfg.init!r} is not valid; choose one of: {', '.join(INITS)}")
        super().__init__(cfg, spec)

    def layer(self, name: str, linear: nn.Linear, qw: QuantWeight | None) -> nn.Module:
        c = self.cfg
        return L4QLinear(linear.weight, linear.bias, self.spec, c.rank, c.alpha, c.lsq_grad_scale, c.init)
