"""Block-wise reconstruction: the engine of OmniQuant (LWC) and EfficientQAT's Block-AP.

Per decoder block, in order, every target linear of the block gets a trainable fake quantizer
(a :class:`BlockQuantizer`: the stage decides what trains). The block, with its targets computing
through those quantizers, is trained to reproduce the fp model's block output:

    min  ‖ block_Q(x_Q) − block_fp(x_fp) ‖²     (mean squared error, AdamW, no weight decay)

where ``x_fp`` is the fp model's input to the block and ``x_Q`` the input produced by the already
quantized blocks before it (as OmniQuant's and EfficientQAT's released code do: two trajectories,
fp targets). After ``epochs`` passes over the calibration sequences the quantizers are frozen into
:class:`QuantWeight` results, and the block, computing with them, gives the next block's ``x_Q``.
The model's own weights are never changed; only the results are kept.

Memory: both trajectories (``samples × seqlen × hidden`` each) wait on the CPU; one block trains at
a time on the compute device. At Block-AP's paper scale (4096 × 2048 tokens of a 4096-wide model in
bf16) that is 64 GiB of host memory per trajectory: the released code keeps them on disk instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..models import set_module
from .gptq import OFFLOAD, _block_list, _first_block_inputs, _hidden, _to, _with_hidden
from .grid import QuantSpec, QuantWeight


class BlockQuantizer(nn.Module):
    """A trainable fake quantizer for one linear: ``forward()`` is the (differentiable) quantized
    weight, ``result()`` the integer :class:`QuantWeight` that computes the same weight."""

    spec: QuantSpec

    def forward(self) -> Tensor:
        raise NotImplementedError

    def result(self) -> QuantWeight:
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        """Optimizer groups ``{"params": [...], "lr": ...}`` (a group at lr 0 is left out: frozen)."""
        raise NotImplementedError


class _Fake(nn.Module):
    """Stands in for a target linear inside its block while the block trains."""

    def __init__(self, q: BlockQuantizer, bias: Tensor | None) -> None:
        super().__init__()
        self.q, self.bias = q, bias

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.q().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def _block_out(block: nn.Module, args: tuple, kwargs: dict, hidden: Tensor, device: torch.device) -> Tensor:
    a, k = _with_hidden(_to(args, device), _to(kwargs, device), hidden.to(device))
    return _hidden(block(*a, **k))


def _train_block(block: nn.Module, prefix: str, linears: dict[str, nn.Linear],
                 make: Callable[[str, nn.Linear], BlockQuantizer], x_q: list[Tensor], x_fp: list[Tensor],
                 ctx: list, epochs: int, device: torch.device, gen: torch.Generator, stats: dict) -> dict:
    """Swap each linear of the block for its trainable quantizer, train, swap back; the results."""
    block.requires_grad_(False)  # only the quantizers train
    quantizers = {n: make(n, lin).to(device) for n, lin in linears.items()}
    for n, q in quantizers.items():
        set_module(block, n[len(prefix):], _Fake(q, linears[n].bias))
    try:
        groups = [g for q in quantizers.values() for g in q.param_groups() if g["lr"] > 0]
        opt = torch.optim.AdamW(groups, weight_decay=0.0) if groups and epochs else None
        losses = []
        with torch.enable_grad():
            for _ in range(epochs if opt else 0):
                total = 0.0
                for j in torch.randperm(len(x_q), generator=gen).tolist():
                    loss = F.mse_loss(_block_out(block, *ctx[j], x_q[j], device).float(),
                                      x_fp[j].to(device).float())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach())
                losses.append(total / len(x_q))
        if losses:
            stats.update(loss_first=losses[0], loss_last=losses[-1])
        with torch.no_grad():
            return {n: q.result() for n, q in quantizers.items()}
    finally:
        for n, lin in linears.items():
            set_module(block, n[len(prefix):], lin)


class Fixed(BlockQuantizer):
    """A finished :class:`QuantWeight` as a quantizer with nothing to train (for measuring errors)."""

    def __init__(self, qw: QuantWeight) -> None:
        super().__init__()
        self.qw, self.spec = qw, qw.spec

    def forward(self) -> Tensor:
        return self.qw.dequantize()

    def result(self) -> QuantWeight:
        return self.qw

    def param_groups(self) -> list[dict]:
        return []


def block_errors(model: nn.Module, targets: dict[str, nn.Linear], calib_ids: Tensor,
                 results: dict[str, QuantWeight], batch: int = 2) -> list[float]:
    """Per block, the mean squared error of the quantized block's output (on the quantized model's
    input) against the fp model's: the objective of :func:`reconstruct`, for any base."""
    log: list = []
    reconstruct(model, targets, calib_ids, lambda n, lin: Fixed(results[n]), 0, batch, log=log)
    return [b["error"] for b in log]


def reconstruct(model: nn.Module, targets: dict[str, nn.Linear], calib_ids: Tensor,
                make: Callable[[str, nn.Linear], BlockQuantizer], epochs: int, batch: int,
                device: torch.device | str | None = None, seed: int = 0,
                log: list | None = None) -> dict[str, QuantWeight]:
    """Train ``make(name, linear)`` for every target block by block (see the module docstring) on
    ``calib_ids [n, seqlen]``, ``batch`` sequences a step; return each target's :class:`QuantWeight`.
    ``log`` (if given) receives per block ``{block, loss_first, loss_last, error}`` (the mean training
    loss of the first and last epoch, and the output error of the finished block)."""
    found = _block_list(model, list(targets))
    if found is None:
        raise ValueError("block-wise reconstruction needs the targets inside one list of decoder blocks "
                         f"(nn.ModuleList); none holds every target of {', '.join(list(targets)[:3])}, ...")
    list_name, blocks = found
    home = next(model.parameters()).device
    device = home if device is None else torch.device(device)
    with torch.no_grad():
        ctx = _first_block_inputs(model, blocks[0], calib_ids.to(home), batch)  # (args, kwargs) per batch
    x_q = [a[0] if a else k["hidden_states"] for a, k in ctx]  # the quantized model's block inputs
    ctx = [((a[0][:0], *a[1:]) if a else a, {k: v for k, v in kw.items() if k != "hidden_states"}) for a, kw in ctx]
    x_fp = [h.clone() for h in x_q]  # the fp model's
    gen = torch.Generator().manual_seed(seed)
    results: dict[str, QuantWeight] = {}
    for i, block in enumerate(tqdm(blocks, desc="block-wise reconstruction", leave=False)):
        stats: dict = {}
        names = [n for n in targets if n.startswith(f"{list_name}.{i}.")]
        block_home = next(block.parameters()).device
        block.to(device)
        with torch.no_grad():  # the fp block's outputs: the targets, and the next block's fp inputs
            for j, h in enumerate(x_fp):
                x_fp[j] = _block_out(block, *ctx[j], h, device).to(OFFLOAD)
        if names:
            results.update(_train_block(block, f"{list_name}.{i}.", {n: targets[n] for n in names}, make, x_q,
                                        x_fp, ctx, epochs, device, gen, stats))
        saved = {n: targets[n].weight.data for n in names}
        try:
            with torch.no_grad():  # this block's output error, and the next block's quantized input
                err = 0.0
                for n in names:
                    targets[n].weight.data = results[n].dequantize().to(saved[n].dtype)
                for j, h in enumerate(x_q):
                    x_q[j] = _block_out(block, *ctx[j], h, device)
                    err += float(F.mse_loss(x_q[j].float(), x_fp[j].to(device).float()))
                    x_q[j] = x_q[j].to(OFFLOAD)
                stats["error"] = err / len(x_q)
        finally:
            for n in names:
                targets[n].weight.data = saved[n]
        if log is not None:
            log.append({"block": i, **stats})
        block.to(block_home)
        for n in names:
            q = results[n]
            results[n] = QuantWeight(q.codes.to(block_home), q.scale.to(block_home), q.zero.to(block_home), q.spec)
    return results
