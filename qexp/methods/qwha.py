"""QWHA (Jeon et al., ICLR 2026): quantization-aware Walsh–Hadamard adaptation.

Per target linear, a sparse coefficient matrix ``F`` (``p`` trainable values ``c`` at fixed
locations ``E``) is mapped to a dense update by one inverse transform along the input dim:
``ΔW = scale · T⁻¹(F)`` and ``y = x (W_Q + ΔW)ᵀ`` with ``W_Q`` the dequantized frozen base.
``T`` is the WHT (QWHA) or, for the paper's Table 4 ablations, the DCT, the DHT or none
(``transform``; :mod:`qexp.quant.transforms`, all with ``T Tᵀ = n I``). The budget is LoRA's
parameter count, ``p = r (d_in + d_out)``.

Initialization (AdaAlloc + value refinement) minimizes ``‖(ΔW_Q − ΔW) X‖`` with
``ΔW_Q = W0 − W_Q`` on calibration activations:
  1. ``Hs = XᵀX + λI`` (fp64, ``λ = damp·mean diag``); ``B = R Tᵀ/d_in`` with ``RᵀR = Hs``.
  2. ``x0_j = T(δ_j)``: the dense coefficients of channel j's error.
  3. AdaAlloc: channel budgets ``p_j ∝ w_j^t`` (capped at d_in, overflow and leftover
     redistributed so ``Σ p_j = p``); ``w_j = ‖x0_j‖`` (code) or ``‖(ΔW_Q X)_j‖`` (paper).
  4. Inside a channel, top-p_j by ``‖B_k‖² x0_jk²`` (code) or ``|x0_jk|`` (paper) (``score``).
     Table 2/4's other selections (``select``): random, magnitude, ssh, loca (see :func:`qwha_init`).
  5. Refinement: ``c_j = (B'ᵀB')⁻¹ B'ᵀ v_j``, ``v_j = R δ_j`` (``init=zero``: c = 0 instead).
Everything needs only ``Hs``, never ``R`` itself: ``BᵀB = T Hs Tᵀ/d²`` and ``Bᵀv_j = T Hs δ_j/d``
(the normal equations of the spec's least squares, evaluated without the eigendecomposition).

The zero-initialized sparse baselines (SSH, LoCA, SHiRA) reuse this file's layer
(:class:`SparseSpectralLinear`), selections and budget rule.

Not on the integer grid: the deployed model is the integer base plus the fp sparse adapter.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..quant import QuantLinear, QuantWeight, act_linear
from ..quant import transforms as T
from ..quant.gptq import OFFLOAD, _block_list, _first_block_inputs, _hidden, _to, _with_hidden
from . import register
from .base import Method, MethodConfig, MethodLayer

log = logging.getLogger(__name__)

SELECTS = ("adaalloc", "random", "magnitude", "loca", "ssh")
INITS = ("qa", "zero")
SEMANTICS = ("code", "paper")


@dataclass
class QWHAConfig(MethodConfig):
    rank: int = 8  # budget p = rank·(d_in + d_out) per layer (LoRA-rank parameter count)
    alpha: float = 4000.0  # the paper's explicit scaling α
    alpha_semantics: str = "code"  # code: ΔW = α/√d_out·iWHT(F); paper: α/√d_in·iWHT(F) (= α/d_in · F Ĥ)
    transform: str = "wht"  # wht (QWHA) | dct (Table 4 "DCA") | dht ("DHA") | none (plain sparse adapter)
    select: str = "adaalloc"  # locations: adaalloc | random | magnitude (global top-p) | loca | ssh (Table 2/4)
    init: str = "qa"  # qa: values fit to the quantization error | zero: c = 0 (Table 4 "no QA init")
    refine: bool = True  # least-squares value refinement (False: the dense coefficients x0)
    temperature: float = 1.0  # AdaAlloc t: p_j ∝ w_j^t
    alloc_weight: str = "code"  # code: w_j = ‖x0_j‖; paper: w_j = ‖(ΔW_Q X)_j‖
    score: str = "code"  # selection score. code: ‖B_k‖²·x0_jk²; paper: |x0_jk|
    damp: float = 1e-4  # λ = damp · mean(diag XᵀX)
    calib_samples: int = 32  # calibration sequences used for XᵀX (≤ 0: all that are passed)
    calib_batch: int = 4  # sequences per calibration forward

    def __post_init__(self) -> None:  # refused when the config is built (qexp.config.validate), before any work
        for key, choices in [("transform", T.TRANSFORMS), ("select", SELECTS), ("init", INITS),
                             ("alpha_semantics", SEMANTICS), ("alloc_weight", SEMANTICS), ("score", SEMANTICS)]:
            if (value := getattr(self, key)) not in choices:
                raise ValueError(f"method.{key}={value!r} is not valid; choose one of: {', '.join(choices)}")
        if self.rank <= 0:
            raise ValueError(f"method.rank={self.rank} must be positive")


def sparse_delta(idx: Tensor, c: Tensor, shape: tuple[int, int], scale: float, transform: str = "wht",
                 two_d: bool = False) -> Tensor:
    """``scale · T⁻¹(F)`` with ``F`` the ``[d_out, d_in]`` scatter of ``c`` at flat indices ``idx``; the
    inverse transform runs along d_in (QWHA's single transform) or along both dims (``two_d``: SSH, LoCA)."""
    dense = c.new_zeros(shape[0] * shape[1]).scatter_(0, idx, c * scale)  # scale p values, not d_out·d_in
    return spectral_delta(dense.view(shape), transform, two_d)


def spectral_delta(f: Tensor, transform: str, two_d: bool) -> Tensor:
    """``T⁻¹(F)`` of a dense coefficient matrix (see :mod:`qexp.quant.transforms` for the scaling)."""
    return T.inverse2d(f, transform) if two_d else T.inverse(f, transform)


def adapter_forward(base: QuantLinear, delta: Tensor, x: Tensor) -> Tensor:
    """``x (W_Q + ΔW)ᵀ + b``: the one forward shared by training and the deployed module."""
    w_q = base.weight_fp()
    w = w_q.add_(delta) if torch.result_type(w_q, delta) == w_q.dtype else w_q + delta  # W_Q + ΔW, in place
    return act_linear(x, w, base.bias)


class QWHADeployed(nn.Module):
    """Integer base (a :class:`QuantLinear`) + frozen fp sparse spectral adapter; not on the grid."""

    def __init__(self, base: QuantLinear, idx: Tensor, c: Tensor, scale: float, transform: str = "wht",
                 two_d: bool = False) -> None:
        super().__init__()
        self.base, self.scale, self.transform, self.two_d = base, scale, transform, two_d
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_buffer("idx", idx)
        self.register_buffer("c", c.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        shape = (self.out_features, self.in_features)
        return adapter_forward(self.base, sparse_delta(self.idx, self.c, shape, self.scale, self.transform,
                                                       self.two_d), x)


class SparseSpectralLinear(MethodLayer):
    """Frozen quantized base + trainable sparse coefficients ``c`` (the only parameter) at fixed
    locations, ``ΔW = scale · T⁻¹(F)``: QWHA and its ablations, SSH, SHiRA (``transform="none"``)."""

    ON_GRID = False
    DEPLOYED = "integer base + fp adapter"

    def __init__(self, qw: QuantWeight, bias: Tensor | None, idx: Tensor, c: Tensor, scale: float,
                 transform: str = "wht", two_d: bool = False) -> None:
        super().__init__()
        self.base = QuantLinear(qw, bias)
        self.scale, self.transform, self.two_d = scale, transform, two_d
        order = torch.argsort(idx)
        self.register_buffer("idx", idx[order].contiguous())
        self.c = nn.Parameter(c[order].detach().clone())

    @property
    def locations(self) -> Tensor:
        """``E``: the ``[p, 2]`` (row, col) locations of the coefficients."""
        d_in = self.base.in_features
        return torch.stack((self.idx // d_in, self.idx % d_in), dim=1)

    def delta(self) -> Tensor:
        return sparse_delta(self.idx, self.c, (self.base.out_features, self.base.in_features), self.scale,
                            self.transform, self.two_d)

    def forward(self, x: Tensor) -> Tensor:
        return adapter_forward(self.base, self.delta(), x)

    def merge(self) -> nn.Module:
        return QWHADeployed(self.base, self.idx, self.c, self.scale, self.transform, self.two_d)


class QWHALinear(SparseSpectralLinear):
    """QWHA's layer: sparse coefficients in the WHT (or, for the Table 4 ablations, DCT / DHT / no
    transform) domain along d_in."""


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
def hessian_terms(hess: Tensor, damp: float, transform: str = "wht") -> tuple[Tensor, Tensor, Tensor]:
    """``(XᵀX, Hs = XᵀX + λI, G = BᵀB = T Hs Tᵀ/d²)`` in fp64; shared by layers with one input."""
    h = hess.double()
    d_in = h.shape[0]
    hs = h + damp * h.diagonal().mean() * torch.eye(d_in, dtype=torch.float64, device=h.device)
    return h, hs, T.forward(T.forward(hs, transform).T, transform) / d_in**2  # forward(hs) = Hs Tᵀ; Hs symmetric


def needs_hessian(cfg: QWHAConfig) -> bool:
    """Every selection but ``random`` and every QA init reads ``XᵀX``; random locations with c = 0 do not."""
    return not (cfg.select == "random" and cfg.init == "zero")


def _top_mask(score: Tensor, p: int, mask: Tensor | None = None) -> Tensor:
    """``mask`` (or an empty one) plus the ``p`` largest entries of ``score`` outside it."""
    mask = torch.zeros(score.shape, dtype=torch.bool, device=score.device) if mask is None else mask.clone()
    flat = score.flatten().masked_fill(mask.flatten(), -torch.inf)
    return mask.view(-1).index_fill_(0, torch.topk(flat, p).indices, True).view(score.shape)


def _random_mask(shape: tuple[int, int], p: int, generator: torch.Generator | None, device: torch.device,
                 mask: Tensor | None = None) -> Tensor:
    """``mask`` (or an empty one) plus ``p`` locations drawn uniformly from those outside it."""
    mask = torch.zeros(shape, dtype=torch.bool, device=device) if mask is None else mask.clone()
    free = (~mask).flatten().nonzero().squeeze(1)
    pick = free[torch.randperm(free.numel(), generator=generator)[:p].to(device)]
    return mask.view(-1).index_fill_(0, pick, True).view(shape)


@torch.no_grad()
def qwha_init(delta_q: Tensor, hess: Tensor | tuple[Tensor, Tensor, Tensor] | None, p: int, cfg: QWHAConfig,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Locations (flat indices, ``[p]``) and true coefficients ``c`` (``ΔW = T⁻¹(F)``, no α scale).

    ``delta_q = W0 − W_Q`` (``[d_out, d_in]``); ``hess``: ``XᵀX`` (``[d_in, d_in]``, undamped) or
    its :func:`hessian_terms`. Selections (``cfg.select``): adaalloc (per-channel budgets, top-p_j of
    the score), magnitude (one global top-p of the score), ssh (SSH's rule: half the budget by the
    score, half at random among the rest), loca (the largest ``|∂L/∂F|`` at ``F = 0`` of the
    layer-output loss ``L = ‖(ΔW_Q − ΔW)X‖²``: LoCA's gradient criterion for locations, taken on
    QWHA's objective), random.
    """
    d_out, d_in = delta_q.shape
    t = cfg.transform
    if cfg.select == "random":
        mask = _random_mask((d_out, d_in), p, generator, delta_q.device)
    if not needs_hessian(cfg):
        return mask.flatten().nonzero().squeeze(1), delta_q.new_zeros(p, dtype=torch.float64)
    if hess is None:
        raise ValueError(f"method.select={cfg.select!r} with method.init={cfg.init!r} needs calibration Hessians")
    delta = delta_q.double()
    h, hs, gram = hessian_terms(hess, cfg.damp, t) if isinstance(hess, Tensor) else hess
    x0 = T.forward(delta, t)  # dense coefficients: T⁻¹(x0) = δ
    rhs = T.forward(delta @ hs, t) / d_in  # Bᵀ v_j = M Hs δ_j (M = T/d); −½ ∂L/∂F at F = 0
    score = gram.diagonal() * x0.square() if cfg.score == "code" else x0.abs()
    if cfg.select == "magnitude":  # one global top-p of the score (the paper's "Magnitude")
        mask = _top_mask(score, p)
    elif cfg.select == "ssh":
        mask = _random_mask((d_out, d_in), p - p // 2, generator, delta.device, _top_mask(score, p // 2))
    elif cfg.select == "loca":
        mask = _top_mask(rhs.abs(), p)
    elif cfg.select == "adaalloc":
        # code: ‖x0_j‖ (∝ ‖δ_j‖); paper: ‖(ΔW_Q X)_j‖ = sqrt(δ_jᵀ XᵀX δ_j)
        w = x0.norm(dim=1) if cfg.alloc_weight == "code" else ((delta @ h) * delta).sum(1).clamp(min=0).sqrt()
        counts = adaalloc(w.pow(cfg.temperature), p, d_in)
        mask = _topk_mask(score, counts)
    if cfg.init == "zero":
        coef = torch.zeros_like(x0)
    elif cfg.refine:
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
        cfg.__post_init__()  # a config edited after construction (bench) is checked again
        self.hessians: Hessians | dict[str, Tensor] = {}
        self._terms: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # id(XᵀX) -> its terms, while shared
        self.stats: dict[str, float] = {"calib_s": 0.0, "init_s": 0.0, "layers": 0}
        self.errors: dict[str, tuple[float, float]] = {}  # layer -> (‖ΔW_Q X‖², ‖(ΔW_Q − ΔW)X‖²) per token

    def prepare(self, model: nn.Module, targets: dict[str, nn.Linear], calib: Tensor | None) -> None:
        """Check every size, then accumulate ``XᵀX`` per target input (fp64) on the fp model."""
        self.stats["targets"] = len(targets)
        for name, lin in targets.items():
            try:
                T.check(self.cfg.transform, lin.in_features)
            except ValueError as e:
                raise ValueError(f"{name}.in_features={lin.in_features}: {e}") from None
            self.budget(name, lin)
        if not needs_hessian(self.cfg) or calib is None:
            return
        t0 = time.perf_counter()
        if self.cfg.calib_samples > 0:
            calib = calib[: self.cfg.calib_samples]
        self.hessians = Hessians(model, targets, calib, self.cfg.calib_batch)
        self.stats["calib_s"] = time.perf_counter() - t0  # the first block's inputs; the blocks run in layer()

    def budget(self, name: str, lin: nn.Linear) -> int:
        return budget(self.cfg.rank, name, lin)

    def scale(self, d_in: int, d_out: int) -> float:
        return self.cfg.alpha / math.sqrt(d_out if self.cfg.alpha_semantics == "code" else d_in)

    def _hessian_terms(self, name: str, device: torch.device) -> tuple[Tensor, Tensor, Tensor] | None:
        """The damped Hessian and Gram of ``name``'s input, computed once per shared input and
        released after its last user."""
        hess = self.hessians.pop(name, None)
        if hess is None:
            return None
        terms = self._terms.pop(id(hess), None)
        if terms is None:
            terms = hessian_terms(hess.to(device), self.cfg.damp, self.cfg.transform)
        if any(h is hess for h in self.hessians.values()):  # kept for the input's other targets
            self._terms[id(hess)] = terms
        return terms

    def layer(self, name: str, linear: nn.Linear, qw: QuantWeight | None) -> nn.Module:
        t0 = time.perf_counter()
        d_out, d_in = linear.weight.shape
        delta_q = linear.weight.detach().double() - qw.dequantize().double()
        terms = self._hessian_terms(name, delta_q.device)
        idx, coef = qwha_init(delta_q, terms, self.budget(name, linear), self.cfg)
        if terms is not None:  # Table 2: the layer-output error before (zero adapter) and after init
            delta = sparse_delta(idx, coef, (d_out, d_in), 1.0, self.cfg.transform)
            self.errors[name] = (layer_output_error(delta_q, torch.zeros_like(delta_q), terms[0]),
                                 layer_output_error(delta_q, delta, terms[0]))
        s = self.scale(d_in, d_out)
        c = (coef / s).float()  # fp32 values, stored so that the first forward is the refined ΔW
        self.stats["init_s"] += time.perf_counter() - t0
        self.stats["layers"] += 1
        if self.stats["layers"] == self.stats.get("targets"):
            log.info("qwha: init (select=%s, init=%s, refine=%s, transform=%s) of %d layers in %.1fs",
                     self.cfg.select, self.cfg.init, self.cfg.refine, self.cfg.transform, self.stats["layers"],
                     self.stats["init_s"])
        return QWHALinear(qw, linear.bias, idx.to(linear.weight.device), c.to(linear.weight.device), s,
                          self.cfg.transform)

    def report(self) -> dict:
        """Table 2's quantity: mean layer-output error per token after init, per projection type
        (``q_proj``, ...) and averaged (``avg``), with the zero adapter's (``none``) beside it."""
        return init_error_report(self.errors)


def init_error_report(errors: dict[str, tuple[float, float]]) -> dict:
    """``{"layer_error": {kind: mean, avg: mean}, "layer_error_none": {...}}`` over layers by name suffix."""
    if not errors:
        return {}
    out: dict[str, dict[str, float]] = {"layer_error": {}, "layer_error_none": {}}
    kinds: dict[str, list[tuple[float, float]]] = {}
    for name, e in errors.items():
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append(e)
    for kind, es in [*kinds.items(), ("avg", list(errors.values()))]:
        out["layer_error_none"][kind] = sum(e[0] for e in es) / len(es)
        out["layer_error"][kind] = sum(e[1] for e in es) / len(es)
    return out


class SparseBaseline(Method):
    """QWHA's zero-initialized sparse baselines (SSH, LoCA, SHiRA): ``cfg.rank`` sets QWHA's budget,
    checked for every target before any work (their FFT transforms take any width). Their configs
    check their own values when built (``__post_init__``), so bad values fail in ``validate``."""

    def prepare(self, model: nn.Module, targets: dict[str, nn.Linear], calib: Tensor | None) -> None:
        for name, lin in targets.items():
            budget(self.cfg.rank, name, lin)


def budget(rank: int, name: str, lin: nn.Linear) -> int:
    """QWHA's budget rule, shared by its sparse baselines: ``p = r·(d_in + d_out)`` (LoRA's count);
    refused when it exceeds the layer, naming the largest rank that fits."""
    d_out, d_in = lin.out_features, lin.in_features
    p = rank * (d_in + d_out)
    if p > d_in * d_out:
        raise ValueError(f"method.rank={rank}: budget p={p} exceeds d_in·d_out={d_in * d_out} of "
                         f"{name}; use method.rank ≤ {d_in * d_out // (d_in + d_out)}")
    return p


def _accumulate(linears: dict[str, nn.Linear], run: Callable[[], None], n_tokens: int) -> dict[str, Tensor]:
    """``XᵀX / n_tokens`` (fp64) of each linear's input over the forwards ``run()`` makes. Linears
    that read the very same input tensor (q/k/v, gate/up) share one accumulator (the same tensor).
    Per-batch products are fp32, sums fp64."""
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

    handles = [lin.register_forward_hook(hook(n)) for n, lin in linears.items()]
    try:
        run()
    finally:
        last["x"] = None
        for h in handles:
            h.remove()
    out = {n: h.div_(n_tokens) for n, h in hess.items()}
    for name, owner in alias.items():
        out[name] = out[owner]
    missing = set(linears) - set(out)
    if missing:
        raise RuntimeError(f"no calibration activations reached {sorted(missing)[:3]}")
    return {n: out[n] for n in linears}


@torch.no_grad()
def collect_hessians(model: nn.Module, targets: dict[str, nn.Linear], calib: Tensor,
                     batch: int) -> dict[str, Tensor]:
    """Every target's ``XᵀX / n_tokens`` (fp64) from whole-model forwards: all of them at once."""
    device = next(model.parameters()).device

    def run() -> None:
        for i in range(0, calib.shape[0], batch):
            model(input_ids=calib[i:i + batch].to(device))

    return _accumulate(targets, run, calib.numel())


class Hessians:
    """Each target's ``XᵀX / n_tokens`` (fp64) on the fp model, computed one decoder block at a
    time when first asked for, and released when popped. Between blocks the calibration hidden
    states wait in host memory (as GPTQ's do), so the device holds one block's Hessians, not the
    model's (62 GiB in fp64 at Llama-3.1-8B: 1.5 GiB per 14336-wide ``down_proj``). A block must
    still be fp when its first target is asked for: ``attach`` replaces targets in model order,
    after asking. The same values as :func:`collect_hessians` (the same forwards, block by
    block); a model without a block list gets that one pass. Reads like a dict of them."""

    def __init__(self, model: nn.Module, targets: dict[str, nn.Linear], calib: Tensor, batch: int) -> None:
        self.ready: dict[str, Tensor] = {}
        self.n_tokens = calib.numel()
        found = _block_list(model, list(targets))
        self.pending: list[tuple[nn.Module, str, list[str]]] = []  # blocks in order, their prefix, targets
        if found is None:
            self.ready = collect_hessians(model, targets, calib, batch)
            return
        list_name, blocks = found
        for i, block in enumerate(blocks):
            pre = f"{list_name}.{i}."
            names = [n for n in targets if n.startswith(pre)]
            if names:  # names, not modules: a replaced fp linear must be free to go
                self.pending.append((block, pre, names))
        home = next(model.parameters()).device
        self.inputs = _first_block_inputs(model, blocks[0], calib.to(home), batch)  # on the host

    @torch.no_grad()
    def _next_block(self) -> None:
        block, pre, names = self.pending.pop(0)
        device = next(block.parameters()).device
        linears = {n: block.get_submodule(n.removeprefix(pre)) for n in names}

        def run() -> None:  # the block's Hessians and its outputs (the next block's inputs) in one pass
            for j, (args, kwargs) in enumerate(self.inputs):
                out = _hidden(block(*_to(args, device), **_to(kwargs, device)))
                self.inputs[j] = _with_hidden(args, kwargs, out.to(OFFLOAD)) if self.pending else None

        self.ready.update(_accumulate(linears, run, self.n_tokens))
        if not self.pending:
            self.inputs = []

    def _wait_for(self, name: str) -> None:
        while name not in self.ready and self.pending:
            self._next_block()

    def pop(self, name: str, default: Tensor | None = None) -> Tensor | None:
        self._wait_for(name)
        return self.ready.pop(name, default)

    def __getitem__(self, name: str) -> Tensor:
        self._wait_for(name)
        return self.ready[name]

    def values(self):
        """The Hessians computed and not yet popped."""
        return self.ready.values()
