"""IR-QLoRA (Qin et al., ICML 2024): ICQ base + LoRA with information elastic connections (IEC).

* **ICQ** (information calibration quantization) makes the base: per group the shift ``τ`` that
  maximises the entropy of the codes (:mod:`qexp.quant.icq`; ``quant.range=icq`` on a symmetric grid,
  set by ``conf/method/irqlora.yaml``). The paper quantizes to NF4; here the configured uniform grid.
* **IEC**: the LoRA ``A [r, d_in]``, ``B [d_out, r]`` gain two parameter-free connections with learned
  scalar weights ``β_A``, ``β_B`` (zero at init, as the released code):
  ``h = A x + β_A·mean_r(x)`` (the input split into ``r`` equal chunks, each averaged), and
  ``u = B h + β_B·repeat(h)`` (each of the ``r`` values of ``h`` added to its ``d_out/r`` outputs);
  ``y = x W_Qᵀ + (α/r)·u``. ``r`` must divide both ``d_in`` and ``d_out``.

Not on the grid: the deployed model is the integer base + the fp adapter (mixed precision, as the
paper's 4+16 rows); the merge keeps the training forward's arithmetic (exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError
from ..quant import QuantLinear, QuantWeight, act_linear
from . import register
from .base import Method, MethodLayer
from .lora import LoRAConfig, lora_factors


@dataclass
class IRQLoRAConfig(LoRAConfig):
    dropout: float = 0.0  # LoRA dropout on the adapter input (QLoRA's 7B setting: 0.05)


def iec_update(x: Tensor, a: Tensor, b: Tensor, beta_a: Tensor, beta_b: Tensor, scaling: float) -> Tensor:
    """``(α/r)·(B h + β_B·repeat(h))`` with ``h = A x + β_A·mean_r(x)``, in the activation dtype."""
    r = a.shape[0]
    h = act_linear(x, a) + beta_a.to(x.dtype) * x.unflatten(-1, (r, -1)).mean(-1)
    u = act_linear(h, b).unflatten(-1, (r, -1)) + beta_b.to(x.dtype) * h.unsqueeze(-1)
    return scaling * u.flatten(-2)


class IRQLoRADeployed(nn.Module):
    """Integer base + frozen fp IEC adapter (mixed precision); not on the grid."""

    def __init__(self, base: QuantLinear, a: Tensor, b: Tensor, beta_a: Tensor, beta_b: Tensor,
                 scaling: float) -> None:
        super().__init__()
        self.base, self.scaling = base, scaling
        self.in_features, self.out_features = base.in_features, base.out_features
        for k, v in {"lora_A": a, "lora_B": b, "beta_A": beta_a, "beta_B": beta_b}.items():
            self.register_buffer(k, v.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + iec_update(x, self.lora_A, self.lora_B, self.beta_A, self.beta_B, self.scaling)


class IRQLoRALinear(MethodLayer):
    """Frozen ICQ base (a :class:`QuantLinear`) + LoRA with IEC; ``A``, ``B`` in the training dtype of
    the model (:func:`~.base.param_dtype`), ``β_A``, ``β_B`` fp32 scalars."""

    ON_GRID = False
    DEPLOYED = "integer base + fp adapter"

    def __init__(self, qw: QuantWeight, bias: Tensor | None, rank: int, alpha: float, dropout: float,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.base = QuantLinear(qw, bias)
        d_out, d_in = qw.codes.shape
        like = torch.empty(0, dtype=dtype, device=qw.scale.device)
        self.lora_A, self.lora_B = lora_factors(d_in, d_out, rank, like)
        self.beta_A = nn.Parameter(torch.zeros(1, device=qw.scale.device))
        self.beta_B = nn.Parameter(torch.zeros(1, device=qw.scale.device))
        self.scaling, self.dropout = alpha / rank, dropout

    def forward(self, x: Tensor) -> Tensor:
        xa = F.dropout(x, self.dropout, self.training)
        return self.base(x) + iec_update(xa, self.lora_A, self.lora_B, self.beta_A, self.beta_B, self.scaling)

    def merge(self) -> nn.Module:
        return IRQLoRADeployed(self.base, self.lora_A, self.lora_B, self.beta_A, self.beta_B, self.scaling)


@register
class IRQLoRA(Method):
    name = "irqlora"
    Config = IRQLoRAConfig

    def __init__(self, cfg: IRQLoRAConfig, spec) -> None:
        if cfg.rank <= 0:
            raise ConfigError(f"method.rank={cfg.rank} is not valid; use a positive integer")
        super().__init__(cfg, spec)

    def layer(self, name: str, linear: nn.Linear, qw: QuantWeight | None) -> nn.Module:
        r = self.cfg.rank
        if linear.in_features % r or linear.out_features % r:
            raise ConfigError(f"method.rank={r} must divide {name}'s in_features={linear.in_features} and "
                              f"out_features={linear.out_features} (IEC splits both into r chunks)")
        return IRQLoRALinear(qw, linear.bias, r, self.cfg.alpha, self.cfg.dropout, linear.weight.dtype)
