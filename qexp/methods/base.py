"""The method interface: one small file per method implements it.

A method turns each targeted ``nn.Linear`` into a :class:`MethodLayer` whose forward is the
paper's training forward, and whose :meth:`MethodLayer.merge` returns the deployed module:
a :class:`~qexp.quant.QuantLinear` (integer codes; the method is *on the grid*) or, for
baselines that are not, a float layer or base + adapter that says so (``ON_GRID = False``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..quant import QuantSpec, QuantWeight


def param_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype trainable float tensors (adapters, QAT's weight) are stored in for a model in
    ``model_dtype``: the model's own in fp32 and bf16 (LR-QAT's ``--use-bf16-ab``, QLoRA's bf16
    adapters), fp32 under fp16 (QLoRA's code too: fp16 cannot hold AdamW's state, eps=1e-8 and
    squared gradients below 6e-8 flush to zero, so the first step divides 0 by 0). Quantizer
    scales, zero points and offsets are fp32 in every case; forwards cast to the activation dtype."""
    return torch.float32 if model_dtype == torch.float16 else model_dtype


def scale_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of learned quantizer scales and offsets: fp32 (float64 for a float64 layer)."""
    return torch.promote_types(model_dtype, torch.float32)


@dataclass
class MethodConfig:
    """Hyper-parameters common to every method; each method subclasses this."""

    name: str = ""


class MethodLayer(nn.Module):
    """A target linear during training. Subclasses set ``ON_GRID`` and implement both methods."""

    ON_GRID: ClassVar[bool] = True

    def merge(self) -> nn.Module:
        """The deployed module computing what this layer's training forward computes."""
        raise NotImplementedError


class Method:
    """One QA-PEFT method: how a target linear becomes a trainable layer, and how it trains.

    Class attributes:
      name: registry key (``method=<name>``).
      Config: the method's hyper-parameter dataclass (a :class:`MethodConfig`).
      NEEDS_BASE: True if layers start from the base quantizer's ``QuantWeight`` (RTN/GPTQ);
        False if the method quantizes the fp weight itself (or not at all).
      TRAINS: False for post-training methods (the trainer is skipped).
      NEEDS_CALIB: ``prepare`` gets calibration token ids (QWHA's Hessians), else None.
      ACT_QUANT: False for a method that cannot run under activation/KV quantization (refused
        before work, with ACT_QUANT_WHY); every method here can.
      EVAL_UNMERGED: also evaluate the trained model before merge (``ppl/<set>/unmerged``),
        for methods whose merge changes the model (QLoRA's re-quantization).
    """

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    NEEDS_BASE: ClassVar[bool] = True
    TRAINS: ClassVar[bool] = True
    EVAL_UNMERGED: ClassVar[bool] = False
    NEEDS_CALIB: ClassVar[bool] = False  # prepare() receives calibration token ids
    ACT_QUANT: ClassVar[bool] = True  # False: cannot run with quant.act_bits / kv_bits < 16 (ACT_QUANT_WHY says why)
    ACT_QUANT_WHY: ClassVar[str] = ""

    def __init__(self, cfg: MethodConfig, spec: QuantSpec) -> None:
        self.cfg = cfg
        self.spec = spec

    def prepare(self, model: nn.Module, targets: dict[str, nn.Linear], calib: Tensor | None) -> None:
        """Optional: collect what layer init needs (e.g. activation statistics) before swapping."""

    def report(self) -> dict:
        """Optional: what the method measured while building its layers, for the record (``init``)."""
        return {}

    def layer(self, name: str, linear: nn.Linear, qw: QuantWeight | None) -> nn.Module:
        """Build the training layer for ``linear`` (``qw``: its quantized base, if NEEDS_BASE)."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups; default: every trainable parameter at ``lr``."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}] if params else []

    def optimizer(self, model: nn.Module, lr: float, weight_decay: float, total_steps: int) -> torch.optim.Optimizer:
        """AdamW by default; LoTA-QAF returns t-SignSGD."""
        return torch.optim.AdamW(self.param_groups(model, lr, weight_decay), lr=lr, weight_decay=weight_decay)
