"""LoTA-QAF (Chen et al., NeurIPS 2025): lossless ternary adaptation on a frozen integer grid.

Two ternary matrices per target (stored as float parameters holding -1/0/1; PEFT layout
``lora_A [r, d_in]``, ``lora_B [d_out, r]``) give an integer auxiliary matrix ``ΔW = B A``
(``[d_out, d_in]``, entries in ``[-r, r]``). With the threshold ω and the static boundary masks
``U = [W_int < qmax]``, ``L = [W_int > qmin]`` (computed once from the frozen codes):

* ``Ŵ = +1 where ΔW > ω and U; -1 where ΔW < -ω and L; 0 elsewhere`` (identity STE),
* ``W̃ = ΔW - ω·sg(Ŵ)``, ``μ = mean_group(W̃) / ω`` per (output, quantization group)
  (the released code's ``/ω``; ``mu_scaling=paper`` drops it, paper Eq. 4),
* ``W_eff = s·((W_int - z) + Ŵ + μ)``, built as ``dequantize(W_int + Ŵ, s, z - μ)``.

The merge stores exactly those operands: codes ``W_int + Ŵ`` (in range thanks to the masks)
and the float zero point ``z - μ``, so the merged integer model equals the training forward
bit for bit. The ternary matrices train with t-SignSGD (:class:`TSignSGD`): no learning rate,
each step moves the top-quantile gradient entries of every tensor by one ternary step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..quant import QuantLinear, QuantSpec, QuantWeight, act_linear, dequantize, grouped
from . import register
from .base import Method, MethodConfig, MethodLayer

MU_SCALINGS = ("code", "paper")
SCHEDULES = ("anneal", "fixed")


# --------------------------------------------------------------------------- adapter math

class _TernarizeSTE(torch.autograd.Function):
    """``Ŵ`` from ``ΔW`` (strict thresholds, boundary-masked); identity gradient everywhere."""

    @staticmethod
    def forward(ctx, dw: Tensor, omega: float, up: Tensor, down: Tensor) -> Tensor:
        plus = (dw > omega) & up
        minus = (dw < -omega) & down  # disjoint from plus (ω > 0): one float tensor, -1 filled in
        return plus.to(dw.dtype).masked_fill_(minus, -1.0)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None, None]:
        return g, None, None, None


def ternary_adjustment(dw: Tensor, omega: float, up: Tensor, down: Tensor) -> Tensor:
    """``Ŵ ∈ {-1, 0, 1}``: +1 where ``ΔW > ω`` and ``up``, -1 where ``ΔW < -ω`` and ``down``."""
    return _TernarizeSTE.apply(dw, omega, up, down)


def offset_factor(dw: Tensor, w_hat: Tensor, omega: float, group_size: int, scaling: str = "code") -> Tensor:
    """``μ [d_out, n_groups]``: group mean of ``W̃ = ΔW - ω·sg(Ŵ)``, divided by ω under ``code``."""
    offset = torch.add(dw, w_hat.detach(), alpha=-omega)  # dw - ω·ŵ (ω·ŵ ∈ {0, ±ω} is exact: same bits)
    mu = grouped(offset, group_size).mean(-1)
    return mu / omega if scaling == "code" else mu


def ternarize_init(rank: int, d_in: int, like: Tensor, ratio: float = 0.75) -> Tensor:
    """``A [r, d_in]``: Kaiming-normal, then TWN-ternarized at ``ratio·mean|A|``."""
    a = torch.empty(rank, d_in, dtype=torch.float32, device=like.device)
    nn.init.kaiming_normal_(a)
    delta = ratio * a.abs().mean()
    return ((a > delta).float() - (a < -delta).float()).to(like.dtype)


class LoTALinear(MethodLayer):
    """A frozen integer base plus a ternary adapter; forward and merge share every operand."""

    def __init__(self, qw: QuantWeight, bias: Tensor | None, rank: int, omega: float, mu_scaling: str,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.spec: QuantSpec = qw.spec
        self.omega, self.mu_scaling = float(omega), mu_scaling
        d_out, d_in = qw.codes.shape
        self.register_buffer("codes", qw.codes.clone())
        self.register_buffer("scale", qw.scale.detach().clone())
        self.register_buffer("zero", qw.zero.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        like = torch.empty(0, dtype=dtype, device=qw.codes.device)
        self.lora_A = nn.Parameter(ternarize_init(rank, d_in, like))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, dtype=dtype, device=qw.codes.device))

    @property
    def up(self) -> Tensor:
        """Where a +1 stays on the grid: a static mask of the frozen codes (pitfall 6: reused unchanged
        at merge). Recomputed per forward, not stored: two 1-byte masks per weight are 13 GiB at 8B."""
        return self.codes < self.spec.qmax

    @property
    def down(self) -> Tensor:
        """Where a -1 stays on the grid (see :attr:`up`)."""
        return self.codes > self.spec.qmin

    def delta(self) -> Tensor:
        """``ΔW = B A`` in the scale dtype: small integers, computed exactly."""
        return self.lora_B.to(self.scale.dtype) @ self.lora_A.to(self.scale.dtype)

    def operands(self, dw: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(W_int + Ŵ, z - μ)``: the exactly-integer codes and the float zero point."""
        dw = self.delta() if dw is None else dw
        w_hat = ternary_adjustment(dw, self.omega, self.up, self.down)
        mu = offset_factor(dw, w_hat, self.omega, self.spec.group_size, self.mu_scaling)
        return w_hat + self.codes, self.zero - mu  # integer codes promoted exactly, no converted copy

    def weight(self) -> Tensor:
        codes, zero = self.operands()
        return dequantize(codes, self.scale, zero, self.spec.group_size)

    def forward(self, x: Tensor) -> Tensor:
        return act_linear(x, self.weight(), self.bias)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        codes, zero = self.operands()
        return QuantLinear(QuantWeight(codes, self.scale, zero, self.spec), self.bias)

    @torch.no_grad()
    def merge_counts(self) -> dict[str, int]:
        """How many codes the adapter raises, lowers and leaves (the paper's Appendix Table 2)."""
        w_hat = ternary_adjustment(self.delta(), self.omega, self.up, self.down)
        up, down = int((w_hat > 0).sum()), int((w_hat < 0).sum())
        return {"codes_total": w_hat.numel(), "codes_increased": up, "codes_decreased": down,
                "codes_unchanged": w_hat.numel() - up - down}

    def extra_repr(self) -> str:
        return f"rank={self.lora_A.shape[0]}, omega={self.omega}, mu_scaling={self.mu_scaling}"


# --------------------------------------------------------------------------- t-SignSGD

def quantile_fp32(x: Tensor, q: float) -> Tensor:
    """``torch.quantile(x, q)`` (linear interpolation) in fp32 via two ``kthvalue`` calls.

    ``torch.quantile`` refuses bf16 and inputs above 2^24 elements; order statistics by
    ``kthvalue`` are exact, need one fp32 copy of ``x`` and no size limit.
    """
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    pos = q * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    v_lo = flat.kthvalue(lo + 1).values
    if pos == lo:
        return v_lo
    v_hi = flat.kthvalue(hi + 1).values
    return torch.lerp(v_lo, v_hi, pos - lo)


class TSignSGD(torch.optim.Optimizer):
    """Thresholded sign SGD for ternary tensors (LoTA-QAF §3.3, released ``tSignSGD``).

    At step ``t = 1..T`` (``T = total_steps``, the true number of optimizer steps):
    ``q_t`` goes ``q_start → q_mid`` linearly over the first ``phase1·T`` steps, then
    ``q_mid → q_end`` (``schedule="anneal"``, code) or stays at ``q_end`` (``"fixed"``, paper);
    per tensor ``σ_t = quantile(|g|, q_t)``, ``M = (|g| > σ_t) ∧ (|g| > τ)``; in phase 2, if the
    global gradient norm exceeds ``guard_norm``, also ``|g| < quantile(|g|, guard_q)``;
    ``p ← round(clip(p - sign(g)⊙M, -1, 1))``. No lr, momentum or weight decay; ``lr`` is only
    kept in the groups for LR schedulers. The step count lives in the param groups, so
    ``state_dict()`` carries it and a resumed run continues the schedule.
    """

    def __init__(self, params, total_steps: int, q_start: float = 0.95, q_mid: float = 0.999,
                 q_end: float = 0.9999, phase1: float = 0.8, schedule: str = "anneal", tau: float = 1e-9,
                 guard: bool = True, guard_norm: float = 10.0, guard_q: float = 0.99995) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps={total_steps}: t-SignSGD needs the number of optimizer steps (>= 1)")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is not valid; choose one of: {', '.join(SCHEDULES)}")
        if not 0.0 <= q_start <= q_mid <= q_end <= 1.0:
            raise ValueError(f"quantiles must satisfy 0 <= q_start <= q_mid <= q_end <= 1, got "
                             f"{q_start}, {q_mid}, {q_end}")
        if not 0.0 < phase1 <= 1.0:
            raise ValueError(f"phase1={phase1}: must be in (0, 1]")
        defaults = dict(lr=0.0, step=0, q=q_start)
        super().__init__(params, defaults)
        self.total_steps, self.schedule, self.phase1 = total_steps, schedule, phase1
        self.q_start, self.q_mid, self.q_end = q_start, q_mid, q_end
        self.tau, self.guard, self.guard_norm, self.guard_q = tau, guard, guard_norm, guard_q

    def level(self, t: int) -> tuple[float, bool]:
        """``(q_t, in_phase2)`` for step ``t`` (``t=0`` gives ``q_start``)."""
        end1 = self.phase1 * self.total_steps
        if t <= end1:
            return self.q_start + (t / end1) * (self.q_mid - self.q_start), False
        if self.schedule == "fixed" or t >= self.total_steps:
            return self.q_end, True
        return self.q_mid + (t - end1) / (self.total_steps - end1) * (self.q_end - self.q_mid), True

    @property
    def steps_done(self) -> int:
        return int(self.param_groups[0]["step"]) if self.param_groups else 0

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t = self.steps_done + 1
        q, phase2 = self.level(t)
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        guarded = False
        if phase2 and self.guard and grads:
            norm = torch.sqrt(sum(gr.float().pow(2).sum() for gr in grads))
            guarded = bool(norm > self.guard_norm)
        for group in self.param_groups:
            group["step"], group["q"] = t, q
            for p in group["params"]:
                if p.grad is None:
                    continue
                mag = p.grad.detach().float().abs()
                mask = (mag > quantile_fp32(mag, q)) & (mag > self.tau)
                if guarded:
                    mask &= mag < quantile_fp32(mag, self.guard_q)
                move = torch.where(mask, torch.sign(p.grad.float()), torch.zeros_like(mag))
                p.copy_((p.float() - move).clamp_(-1, 1).round_().to(p.dtype))
            group["guarded"] = guarded
        return loss


# --------------------------------------------------------------------------- method

@dataclass
class LoTAConfig(MethodConfig):
    rank: int = 64
    omega: float | None = None  # threshold ω; None: omega_ratio · rank
    omega_ratio: float = 0.75
    mu_scaling: str = "code"  # code: μ = mean(W̃)/ω (released code) | paper: μ = mean(W̃) (Eq. 4)
    schedule: str = "anneal"  # anneal: q_mid → q_end in phase 2 (code) | fixed: q_end (paper text)
    q_start: float = 0.95  # filter_ratio: update the top 5 % at the start
    q_mid: float = 0.999  # min_grad: top 0.1 % at the end of phase 1
    q_end: float = 0.9999  # filter_upper: top 0.01 % at the end
    phase1: float = 0.8  # fraction of the steps in phase 1
    tau: float = 1e-9
    guard: bool = True  # phase-2 guard (code only): drop the top 0.005 % when ||g|| > guard_norm
    guard_norm: float = 10.0
    guard_q: float = 0.99995


@register
class LoTA(Method):
    """LoTA-QAF: ternary adapter merged losslessly into the integer codes and float zero points."""

    name = "lota"
    Config = LoTAConfig

    def __init__(self, cfg: LoTAConfig, spec: QuantSpec) -> None:
        super().__init__(cfg, spec)
        if cfg.mu_scaling not in MU_SCALINGS:
            raise ValueError(f"method.mu_scaling={cfg.mu_scaling!r} is not valid; choose one of: "
                             f"{', '.join(MU_SCALINGS)}")
        if cfg.schedule not in SCHEDULES:
            raise ValueError(f"method.schedule={cfg.schedule!r} is not valid; choose one of: "
                             f"{', '.join(SCHEDULES)}")
        if cfg.rank < 1:
            raise ValueError(f"method.rank={cfg.rank} is not valid; use a positive integer")
        if self.omega <= 0:
            raise ValueError(f"method.omega={self.omega} is not valid; use a positive threshold")

    @property
    def omega(self) -> float:
        c = self.cfg
        return float(c.omega) if c.omega is not None else c.omega_ratio * c.rank

    def layer(self, name: str, linear: nn.Linear, qw: QuantWeight | None) -> nn.Module:
        if qw is None:
            raise ValueError("lota starts from the base quantizer's QuantWeight (NEEDS_BASE)")
        c = self.cfg
        return LoTALinear(qw, linear.bias, c.rank, self.omega, c.mu_scaling, linear.weight.dtype)

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        params = [p for m in model.modules() if isinstance(m, LoTALinear) for p in (m.lora_A, m.lora_B)]
        return [{"params": params}] if params else []

    def optimizer(self, model: nn.Module, lr: float, weight_decay: float, total_steps: int) -> TSignSGD:
        """t-SignSGD over the ternary tensors; ``lr`` and ``weight_decay`` are ignored."""
        c = self.cfg
        return TSignSGD(self.param_groups(model, lr, weight_decay), total_steps, c.q_start, c.q_mid, c.q_end,
                        c.phase1, c.schedule, c.tau, c.guard, c.guard_norm, c.guard_q)
