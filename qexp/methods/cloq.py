"""CLoQ (Deng et al. 2025; QWHA's main baseline): LoRA on a frozen integer base, initialized in
closed form to minimize the calibrated layer-output error ``‖(W0 − W_Q − (α/r)·BA) X‖``.

With ``RᵀR = XᵀX + λI`` (``R = Λ^½Vᵀ``, the same Hessian root as QWHA's init) the error is
``‖(ΔW_Q − M) Rᵀ‖_F``, so the best rank-r ``M`` is ``SVD_r(ΔW_Q Rᵀ) R⁻ᵀ``. The factors split
the singular values evenly: ``B = U_r Σ_r^½``, ``A = Σ_r^½ V_rᵀ R⁻ᵀ``, rescaled by ``r/α`` so that
the first forward is exactly ``W_Q + M``. Not on the integer grid (deployed: base + fp LoRA).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quant import QuantLinear, QuantWeight
from . import register
from .base import Method, MethodConfig, MethodLayer, param_dtype
from .lora import lora_update
from .qwha import Hessians


@dataclass
class CLoQConfig(MethodConfig):
    rank: int = 8
    alpha: float = 1.0  # QWHA's CLoQ runs: α = 1 (update (α/r)·BA)
    dropout: float = 0.1  # QWHA's CLoQ runs: LoRA dropout 0.1 (on the adapter input, training only)
    damp: float = 1e-4  # λ = damp · mean(diag XᵀX)
    calib_samples: int = 32  # calibration sequences for XᵀX (≤ 0: all that are passed)
    calib_batch: int = 4


def lora_forward(base: QuantLinear, a: Tensor, b: Tensor, scaling: float, x: Tensor, dropout: float,
                 training: bool) -> Tensor:
    """``x W_Qᵀ + bias + (α/r)·drop(x) Aᵀ Bᵀ`` in the activation dtype: shared by training and the
    deployed module."""
    return base(x) + lora_update(F.dropout(x, dropout, training), a, b, scaling)


class CLoQDeployed(nn.Module):
    """Integer base + frozen fp LoRA (mixed precision); not on the grid."""

    def __init__(self, base: QuantLinear, a: Tensor, b: Tensor, scaling: float) -> None:
        super().__init__()
        self.base, self.scaling = base, scaling
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_buffer("lora_A", a.detach().clone())
        self.register_buffer("lora_B", b.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return lora_forward(self.base, self.lora_A, self.lora_B, self.scaling, x, 0.0, False)


class CLoQLinear(MethodLayer):
    ON_GRID = False
    DEPLOYED = "integer base + fp adapter"

    def __init__(self, qw: QuantWeight, bias: Tensor | None, a: Tensor, b: Tensor, scaling: float,
                 dropout: float) -> None:
        super().__init__()
        self.base = QuantLinear(qw, bias)
        self.lora_A, self.lora_B = nn.Parameter(a), nn.Parameter(b)
        self.scaling, self.dropout = scaling, dropout

    def delta(self) -> Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: Tensor) -> Tensor:
        return lora_forward(self.base, self.lora_A, self.lora_B, self.scaling, x, self.dropout, self.training)

    def merge(self) -> nn.Module:
        return CLoQDeployed(self.base, self.lora_A, self.lora_B, self.scaling)


def eigh(h: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues and eigenvectors of the symmetric ``h`` (``torch.linalg.eigh``; the memory plan
    swaps in a same-sized stand-in)."""
    return torch.linalg.eigh(h)


@torch.no_grad()
def cloq_factors(delta_q: Tensor, hess: Tensor, rank: int, damp: float) -> tuple[Tensor, Tensor]:
    """``B [d_out, r]``, ``A [r, d_in]`` with ``BA`` the best rank-r fit of ``ΔW_Q`` in the ``X`` metric."""
    h = hess.double()
    d_in = h.shape[0]
    lam, vecs = eigh(h + damp * h.diagonal().mean() * torch.eye(d_in, dtype=h.dtype, device=h.device))
    lam = lam.clamp(min=lam.max() * 1e-12)
    r_t = vecs * lam.sqrt()  # Rᵀ = V Λ^½
    u, s, vh = torch.linalg.svd(delta_q.double() @ r_t, full_matrices=False)
    root = s[:rank].sqrt()
    b = u[:, :rank] * root
    a = (root.unsqueeze(1) * vh[:rank]) @ (vecs / lam.sqrt()).T  # Σ^½ V_rᵀ R⁻ᵀ, R⁻ᵀ = Λ^-½ Vᵀ
    return b, a


@register
class CLoQ(Method):
    name = "cloq"
    Config = CLoQConfig
    NEEDS_CALIB = True

    def __init__(self, cfg: CLoQConfig, spec) -> None:
        super().__init__(cfg, spec)
        if cfg.rank <= 0 or cfg.alpha <= 0 or not 0 <= cfg.dropout < 1:
            raise ValueError(f"method.rank={cfg.rank}, method.alpha={cfg.alpha}, method.dropout={cfg.dropout}: "
                             "need rank > 0, alpha > 0 and 0 <= dropout < 1")
        self.hessians: Hessians | dict[str, Tensor] = {}
        self.stats = {"calib_s": 0.0, "init_s": 0.0}

    def prepare(self, model: nn.Module, targets: dict[str, nn.Linear], calib: Tensor | None) -> None:
        for name, lin in targets.items():
            if self.cfg.rank > min(lin.in_features, lin.out_features):
                raise ValueError(f"method.rank={self.cfg.rank} exceeds min(d_in, d_out) of {name}")
        t0 = time.perf_counter()
        if self.cfg.calib_samples > 0:
            calib = calib[: self.cfg.calib_samples]
        self.hessians = Hessians(model, targets, calib, self.cfg.calib_batch)  # one block at a time, in layer()
        self.stats["calib_s"] = time.perf_counter() - t0

    def layer(self, name: str, linear: nn.Linear, qw: QuantWeight | None) -> nn.Module:
        t0 = time.perf_counter()
        delta_q = linear.weight.detach().double() - qw.dequantize().double()
        b, a = cloq_factors(delta_q, self.hessians.pop(name).to(delta_q.device), self.cfg.rank, self.cfg.damp)
        scaling = self.cfg.alpha / self.cfg.rank
        k = math.sqrt(1.0 / scaling)  # (α/r)·(kB)(kA) = BA
        dtype = param_dtype(linear.weight.dtype)
        self.stats["init_s"] += time.perf_counter() - t0
        return CLoQLinear(qw, linear.bias, (k * a).to(dtype), (k * b).to(dtype), scaling, self.cfg.dropout)
