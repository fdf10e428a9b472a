"""QWHA (Jeon et al., ICLR 2026): quantization-aware Walsh–Hadamard adaptation.

Per target linear, a sparse coefficient matrix ``F`` (``p`` trainable values ``c`` at fixed
locations ``E``) is mapped to a dense update by one inverse WHT along the input dim:
``ΔW = scale · iWHT(F)`` and ``y = x (W_Q + ΔW)ᵀ`` with ``W_Q`` the dequantized frozen base.
The budget is LoRA's parameter count, ``p = r (d_in + d_out)``.

Initialization (AdaAlloc + value refinement) minimizes ``‖(ΔW_Q − ΔW) X‖`` with
``ΔW_Q = W0 − W_Q`` on calibration activations:
  1. ``Hs = XᵀX + λI`` (fp64, ``λ = damp·mean diag``); ``B = R Hᵀ/d_in`` with ``RᵀR = Hs``.
  2. ``x0_j = fwht(δ_j)``: the dense WHT coefficients of channel j's error.
  3. AdaAlloc: channel budgets ``p_j ∝ w_j^t`` (capped at d_in, overflow and leftover
     redistributed so ``Σ p_j = p``); ``w_j = ‖x0_j‖`` (code) or ``‖(ΔW_Q X)_j‖`` (paper).
  4. Inside a channel, top-p_j by ``‖B_k‖² x0_jk²`` (code) or ``|x0_jk|`` (paper).
  5. Refinement: ``c_j = (B'ᵀB')⁻¹ B'ᵀ v_j``, ``v_j = R δ_j``.
Everything needs only ``Hs``, never ``R`` itself: ``BᵀB = H Hs Hᵀ/d²`` and ``Bᵀv_j = H Hs δ_j/d``
(the normal equations of the spec's least squares, evaluated without the eigendecomposition).

Not on the integer grid: the deployed model is the integer base plus the fp sparse adapter.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..quant import QuantLinear, QuantWeight, act_linear
from ..quant.hadamard import factor, fwht, ifwht
from . import register
from .base import Method, MethodConfig, MethodLayer

log = logging.getLogger(__name__)

INITS = ("adaalloc", "magnitude", "random", "zero")
SEMANTICS = ("code", "paper")


@dataclass
class QWHAConfig(MethodConfig):
    rank: int = 8  # budget p = rank·(d_in + d_out) per layer (LoRA-rank parameter count)
    alpha: float = 4000.0  # the paper's explicit scaling α
    alpha_semantics: str = "code"  # code: ΔW = α/√d_out·iWHT(F); paper: α/√d_in·iWHT(F) (= α/d_in · F Ĥ)
    init: str = "adaalloc"  # adaalloc | magnitude (global top-p) | random (random E) | zero (random E, c=0)
    refine: bool = True  # least-squares value refinement (False: the dense WHT coefficients x0)
    temperature: float = 1.0  # AdaAlloc t: p_j ∝ w_j^t
    alloc_weight: str = "code"  # code: w_j = ‖x0_j‖; paper: w_j = ‖(ΔW_Q X)_j‖
    select: str = "code"  # code: score ‖B_k‖²·x0_jk²; paper: |x0_jk|
    damp: float = 1e-4  # λ = damp · mean(diag XᵀX)
    calib_samples: int = 32  # calibration sequences used for XᵀX (≤ 0: all that are passed)
    calib_batch: int = 4  # sequences per calibration forward


def sparse_delta(idx: Tensor, c: Tensor, shape: tuple[int, int], scale: float) -> Tensor:
    """``scale · iWHT(F)`` with ``F`` the ``[d_out, d_in]`` scatter of ``c`` at flat indices ``idx``."""
    dense = c.new_zeros(shape[0] * shape[1]).scatter_(0, idx, c * scale)  # scale p values, not d_out·d_in
    return ifwht(dense.view(shape))


def adapter_forward(base: QuantLinear, idx: Tensor, c: Tensor, scale: float, x: Tensor) -> Tensor:
    """``x (W_Q + ΔW)ᵀ + b``: the one forward shared by training and the deployed module."""
    w_q, delta = base.weight_fp(), sparse_delta(idx, c, (base.out_features, base.in_features), scale)
    w = w_q.add_(delta) if torch.result_type(w_q, delta) == w_q.dtype else w_q + delta  # W_Q + ΔW, in place
    return act_linear(x, w, base.bias)


class QWHADeployed(nn.Module):
    """Integer base (a :class:`QuantLinear`) + frozen fp sparse WHT adapter; not on the grid."""

    def __init__(self, base: QuantLinear, idx: Tensor, c: Tensor, scale: float) -> None:
        super().__init__()
        self.base, self.scale = base, scale
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_buffer("idx", idx)
        self.register_buffer("c", c.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return adapter_forward(self.base, self.idx, self.c, self.scale, x)


class QWHALinear(MethodLayer):
    """Frozen quantized base + trainable sparse WHT coefficients ``c`` (the only parameter)."""

    ON_GRID = False
    DEPLOYED = "integer base + fp adapter"

    def __init__(self, qw: QuantWeight, bias: Tensor | None, idx: Tensor, c: Tensor, scale: float) -> None:
        super().__init__()
        self.base = QuantLinear(qw, bias)
        self.scale = scale
        order = torch.argsort(idx)
        self.register_buffer("idx", idx[order].contiguous())
        self.c = nn.Parameter(c[order].detach().clone())

    @property
    def locations(self) -> Tensor:
        """``E``: the ``[p, 2]`` (row, col) locations of the coefficients."""
        d_in = self.base.in_features
        return torch.stack((self.idx // d_in, self.idx % d_in), dim=1)

    def delta(self) -> Tensor:
        return sparse_delta(self.idx, self.c, (self.base.out_features, self.base.in_features), self.scale)

    def forward(self, x: Tensor) -> Tensor:
        return adapter_forward(self.base, self.idx, self.c, self.scale, x)

    def merge(self) -> nn.Module:
        return QWHADeployed(self.base, self.idx, self.c, self.scale)


# ---------------------------------------------------------------- initialization (fp64, no grad)

def adaalloc(weights: Tensor, p: int, cap: int) -> Tensor:
    """Per-channel budgets ``p_j = ⌊p w_j/Σw⌋`` capped at ``cap``; overflow shared equally among
    uncapped channels, leftover +1 to the smallest allocations, so that ``Σ p_j = p``."""
    n = weights.numel()
    if p > n * cap:
        raise ValueError(f"budget p={p} exceeds {n} channels × {cap}")
    w = weights.double().clamp(min=0)
    if not torch.isfinite(w).all() or w.sum() <= 0:
        w = torch.ones_like(w)
    alloc = torch.floor(p * w / w.sum()).long().clamp(max=p)
    while (over := int((alloc - cap).clamp(min=0).sum())) > 0:
        alloc = alloc.clamp(max=cap)
        free = alloc < cap
        alloc[free] += over // int(free.sum())  # the rest of the division is leftover below
    leftover = p - int(alloc.sum())
    while leftover > 0:
        free = torch.nonzero(alloc < cap).squeeze(1)
        take = free[torch.argsort(alloc[free], stable=True)[:leftover]]
        alloc[take] += 1
        leftover -= take.numel()
    return alloc


def _topk_mask(score: Tensor, counts: Tensor) -> Tensor:
    """Row-wise mask of the ``counts[j]`` largest entries of ``score[j]``."""
    k = int(counts.max())
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k == 0:
        return mask
    top = torch.topk(score, k, dim=1, sorted=True).indices
    return mask.scatter_(1, top, torch.arange(k, device=score.device) < counts.unsqueeze(1))


def refine_values(gram: Tensor, rhs: Tensor, mask: Tensor, budget: int = 1 << 24) -> Tensor:
    """Per row j: least squares on the selected columns, ``c_j = G[S,S]⁻¹ rhs_j[S]`` (zero elsewhere).

    Rows are sorted by ``|S_j|`` and solved in batches padded with identity, each batch holding
    at most ``budget`` matrix entries; the cost is ``Σ_j |S_j|³``, never ``d_out · d_in³``.
    """
    d_out = mask.shape[0]
    dev = mask.device
    counts = mask.sum(1)
    cols = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # selected columns first
    rows = torch.argsort(counts, stable=True)
    sizes = counts[rows].tolist()
    out = torch.zeros_like(rhs)
    start = sum(1 for n in sizes if n == 0)
    while start < d_out:
        end = min(d_out, start + max(1, budget // sizes[start] ** 2))
        while end - start > 1 and (end - start) * sizes[end - 1] ** 2 > budget:
            end = start + (end - start) // 2
        chunk, p_max = rows[start:end], sizes[end - 1]
        idx = cols[chunk, :p_max]
        valid = torch.arange(p_max, device=dev) < counts[chunk].unsqueeze(1)
        both = valid.unsqueeze(2) & valid.unsqueeze(1)
        eye = torch.eye(p_max, dtype=gram.dtype, device=dev)
        g = torch.where(both, gram[idx.unsqueeze(2), idx.unsqueeze(1)], eye)
        b = torch.where(valid, rhs[chunk.unsqueeze(1), idx], 0.0)
        out[chunk.unsqueeze(1), idx] = torch.linalg.solve(g, b.unsqueeze(2)).squeeze(2) * valid
        start = end
    return out


@torch.no_grad()
def hessian_terms(hess: Tensor, damp: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(XᵀX, Hs = XᵀX + λI, G = BᵀB = H Hs Hᵀ/d²)`` in fp64; shared by layers with one input."""
    h = hess.double()
    d_in = h.shape[0]
    hs = h + damp * h.diagonal().mean() * torch.eye(d_in, dtype=torch.float64, device=h.device)
    return h, hs, fwht(fwht(hs).T) / d_in**2  # fwht(hs) = Hs Hᵀ; Hs symmetric


@torch.no_grad()
def qwha_init(delta_q: Tensor, hess: Tensor | tuple[Tensor, Tensor, Tensor] | None, p: int, cfg: QWHAConfig,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Locations (flat indices, ``[p]``) and true coefficients ``c`` (``ΔW = iWHT(F)``, no α scale).

    ``delta_q = W0 − W_Q`` (``[d_out, d_in]``); ``hess``: ``XᵀX`` (``[d_in, d_in]``, undamped) or
    its :func:`hessian_terms`.
    """
    d_out, d_in = delta_q.shape
    if cfg.init in ("random", "zero"):
        perm = torch.randperm(d_out * d_in, generator=generator)[:p].to(delta_q.device)
        mask = torch.zeros(d_out * d_in, dtype=torch.bool, device=delta_q.device)
        mask[perm] = True
        mask = mask.view(d_out, d_in)
    if cfg.init == "zero":
        return mask.flatten().nonzero().squeeze(1), delta_q.new_zeros(p, dtype=torch.float64)
    if hess is None:
        raise ValueError(f"method.init={cfg.init!r} needs calibration Hessians")
    delta = delta_q.double()
    h, hs, gram = hessian_terms(hess, cfg.damp) if isinstance(hess, Tensor) else hess
    x0 = fwht(delta)  # dense WHT coefficients: B x0_j = v_j
    if cfg.init in ("adaalloc", "magnitude"):
        score = gram.diagonal() * x0.square() if cfg.select == "code" else x0.abs()
        if cfg.init == "magnitude":  # one global top-p of the score (the paper's "Magnitude")
            mask = torch.zeros(d_out * d_in, dtype=torch.bool, device=delta.device)
            mask[torch.topk(score.flatten(), p).indices] = True
            mask = mask.view(d_out, d_in)
        else:
            # code: ‖x0_j‖ (∝ ‖δ_j‖); paper: ‖(ΔW_Q X)_j‖ = sqrt(δ_jᵀ XᵀX δ_j)
            w = x0.norm(dim=1) if cfg.alloc_weight == "code" else ((delta @ h) * delta).sum(1).clamp(min=0).sqrt()
            counts = adaalloc(w.pow(cfg.temperature), p, d_in)
            mask = _topk_mask(score, counts)
    if cfg.refine:
        rhs = fwht(delta @ hs) / d_in  # Bᵀ v_j = H Hs δ_j / d
        coef = refine_values(gram, rhs, mask)
    else:
        coef = x0 * mask
    idx = mask.flatten().nonzero().squeeze(1)
    return idx, coef.flatten()[idx]


def layer_output_error(delta_q: Tensor, delta: Tensor, hess: Tensor) -> float:
    """``‖(ΔW_Q − ΔW) X‖_F²`` from ``XᵀX``."""
    e = (delta_q - delta).double()
    return float(((e @ hess.double()) * e).sum())


# ---------------------------------------------------------------- the method

@register
class QWHA(Method):
    name = "qwha"
    Config = QWHAConfig
    NEEDS_CALIB = True

    def __init__(self, cfg: QWHAConfig, spec) -> None:
        super().__init__(cfg, spec)
        for key, value, choices in [("init", cfg.init, INITS), ("alpha_semantics", cfg.alpha_semantics, SEMANTICS),
                                    ("alloc_weight", cfg.alloc_weight, SEMANTICS), ("select", cfg.select, SEMANTICS)]:
            if value not in choices:
                raise ValueError(f"method.{key}={value!r} is not valid; choose one of: {', '.join(choices)}")
        if cfg.rank <= 0:
            raise ValueError(f"method.rank={cfg.rank} must be positive")
        self.hessians: dict[str, Tensor] = {}
        self._terms: dict[int, tuple[tuple[Tensor, Tensor, Tensor], int]] = {}  # id(XᵀX) -> (terms, users left)
        self.stats: dict[str, float] = {"calib_s": 0.0, "init_s": 0.0, "layers": 0}

    def prepare(self, model: nn.Module, targets: dict[str, nn.Linear], calib: Tensor | None) -> None:
        """Check every size, then accumulate ``XᵀX`` per target input (fp64) on the fp model."""
        self.stats["targets"] = len(targets)
        for name, lin in targets.items():
            try:
                factor(lin.in_features)
            except ValueError as e:
                raise ValueError(f"{name}.in_features={lin.in_features}: {e}") from None
            self.budget(name, lin)
        if self.cfg.init == "zero" or calib is None:
            return
        t0 = time.perf_counter()
        if self.cfg.calib_samples > 0:
            calib = calib[: self.cfg.calib_samples]
        self.hessians = collect_hessians(model, targets, calib, self.cfg.calib_batch)
        for h in self.hessians.values():
            terms, users = self._terms.get(id(h), (None, 0))
            self._terms[id(h)] = (terms, users + 1)
        self.stats["calib_s"] = time.perf_counter() - t0
        log.info("qwha: XᵀX over %d×%d tokens in %.1fs", *calib.shape, self.stats["calib_s"])

    def budget(self, name: str, lin: nn.Linear) -> int:
        d_out, d_in = lin.out_features, lin.in_features
        p = self.cfg.rank * (d_in + d_out)
        if p > d_in * d_out:
            raise ValueError(f"method.rank={self.cfg.rank}: budget p={p} exceeds d_in·d_out={d_in * d_out} of "
                             f"{name}; use method.rank ≤ {d_in * d_out // (d_in + d_out)}")
        return p

    def scale(self, d_in: int, d_out: int) -> float:
        return self.cfg.alpha / math.sqrt(d_out if self.cfg.alpha_semantics == "code" else d_in)

    def _hessian_terms(self, name: str, device: torch.device) -> tuple[Tensor, Tensor, Tensor] | None:
        """The damped Hessian and Gram of ``name``'s input, computed once per shared input and
        released after its last user."""
        hess = self.hessians.pop(name, None)
        if hess is None:
            return None
        terms, users = self._terms.get(id(hess), (None, 1))
        if terms is None:
            terms = hessian_terms(hess.to(device), self.cfg.damp)
        if users > 1:
            self._terms[id(hess)] = (terms, users - 1)
        else:
            self._terms.pop(id(hess), None)
        return terms

    def layer(self, name: str, linear: nn.Linear, qw: QuantWeight | None) -> nn.Module:
        t0 = time.perf_counter()
        d_out, d_in = linear.weight.shape
        delta_q = linear.weight.detach().double() - qw.dequantize().double()
        idx, coef = qwha_init(delta_q, self._hessian_terms(name, delta_q.device), self.budget(name, linear), self.cfg)
        s = self.scale(d_in, d_out)
        c = (coef / s).float()  # fp32 values, stored so that the first forward is the refined ΔW
        self.stats["init_s"] += time.perf_counter() - t0
        self.stats["layers"] += 1
        if self.stats["layers"] == self.stats.get("targets"):
            log.info("qwha: init (%s, refine=%s) of %d layers in %.1fs", self.cfg.init, self.cfg.refine,
                     self.stats["layers"], self.stats["init_s"])
        return QWHALinear(qw, linear.bias, idx.to(linear.weight.device), c.to(linear.weight.device), s)


@torch.no_grad()
def collect_hessians(model: nn.Module, targets: dict[str, nn.Linear], calib: Tensor,
                     batch: int) -> dict[str, Tensor]:
    """``XᵀX / n_tokens`` (fp64) for each target's input. Targets that read the very same input
    tensor (q/k/v, gate/up) share one accumulator. Per-batch products are fp32, sums fp64."""
    hess: dict[str, Tensor] = {}
    last: dict[str, object] = {"x": None, "name": None}
    alias: dict[str, str] = {}

    def hook(name: str):
        def fn(mod: nn.Module, inputs: tuple, out: Tensor) -> None:
            x = inputs[0]
            if x is last["x"]:  # same tensor as the previous target: share its accumulator
                alias[name] = alias.get(last["name"], last["name"])
                return
            last["x"], last["name"] = x, name
            x = x.reshape(-1, x.shape[-1]).float()
            g = (x.T @ x).double()
            if name in hess:
                hess[name] += g
            else:
                hess[name] = g
        return fn

    handles = [lin.register_forward_hook(hook(n)) for n, lin in targets.items()]
    device = next(model.parameters()).device
    try:
        for i in range(0, calib.shape[0], batch):
            model(input_ids=calib[i:i + batch].to(device))
            last["x"] = None
    finally:
        for h in handles:
            h.remove()
    n_tokens = calib.numel()
    out = {n: h.div_(n_tokens) for n, h in hess.items()}
    for name, owner in alias.items():
        out[name] = out[owner]
    missing = set(targets) - set(out)
    if missing:
        raise RuntimeError(f"no calibration activations reached {sorted(missing)[:3]}")
    return {n: out[n] for n in targets}
