"""AWQ (Lin et al., MLSys 2024): activation-aware per-channel scaling, a preprocessing stage of the
base (``quant.awq=true``, before RTN / GPTQ / OmniQuant).

For each set of linears that share one input ``X`` in a Llama-style block (q/k/v after the input
norm, o after v, gate/up after the post-attention norm, down after up), AWQ scales the input
channels: ``W ← W·diag(s)`` and folds ``1/s`` into the op that produces ``X`` (the norm's weight, or
the rows of the previous linear), so the fp model computes the same function. The scale is a power
of the channel's mean activation magnitude, ``s = mean|X|^α`` normalised by ``√(max s · min s)``, with
``α`` from a grid of ``quant.awq_grid`` points in [0, 1) minimising the output error of the quantized
linears, ``Σ ‖X Wᵀ − X (Q(W·s)/s)ᵀ‖²``. Then AWQ's clip search: per group (and output row), the
largest magnitude ``m`` kept, ``W ← clamp(W, −m, m)``, with ``m`` from ``quant.awq_grid`` shrinks down to
half of the max, minimising the same error group by group on 512 of the tokens (q and k are not
clipped, as in the released code). The scaled model is the fp model the method gets; the clipped weights are what the
rounding sees (as MagR's).

Deviations from the released code: the scale search measures the error at the shared linears'
outputs, not at the attention / MLP block output; o_proj is scaled only when v_proj feeds it one
to one (no grouped-query attention), as the released code does. The searches run on
``quant.awq_tokens`` calibration tokens sampled from each input (the clip search on 512 of them).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .gptq import OFFLOAD, _block_list, _first_block_inputs, _hidden, _to
from .grid import QuantSpec, grouped
from .rtn import rtn

# (the op producing the input, the linears reading it), names inside a Llama-style decoder block
GROUPS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
          ("self_attn.v_proj", ("self_attn.o_proj",)),
          ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
          ("mlp.up_proj", ("mlp.down_proj",)))
NO_CLIP = ("q_proj", "k_proj")  # the released code does not clip these (their outputs meet in the softmax)
CLIP_TOKENS = 512  # the released clip search measures the error on 512 of the calibration tokens


def _qdq(w: Tensor, spec: QuantSpec) -> Tensor:
    return rtn(w, spec).dequantize()


@torch.no_grad()
def search_scale(x: Tensor, weights: list[Tensor], spec: QuantSpec, grid: int = 20) -> tuple[Tensor, float]:
    """AWQ's scale ``s [d_in]`` for linears ``weights`` reading ``x [n, d_in]`` (fp32), and its exponent α
    (α = 0, no scaling, is a candidate: the search never does worse than plain rounding on ``x``)."""
    x = x.float()
    mean = x.abs().mean(0)
    ref = [x @ w.float().T for w in weights]
    best, best_s, alpha = float("inf"), torch.ones_like(mean), 0.0
    for k in range(grid):
        s = mean.pow(k / grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = sum(float((x @ (_qdq(w.float() * s, spec) / s).T - y).square().mean()) for w, y in zip(weights, ref,
                                                                                                     strict=True))
        if err < best:
            best, best_s, alpha = err, s, k / grid
    return best_s, alpha


@torch.no_grad()
def search_clip(x: Tensor, w: Tensor, spec: QuantSpec, grid: int = 20, max_shrink: float = 0.5,
                rows: int = 256) -> Tensor:
    """AWQ's clip: per (output row, group) the max magnitude ``[d_out, n_groups]`` minimising that
    group's share of the output error on ``x [n, d_in]``."""
    x = x.float()
    xg = grouped(x, spec.group_size)  # [n, G, g]
    out = []
    for w1 in w.float().split(rows):
        wg = grouped(w1, spec.group_size)  # [o, G, g]
        ref = torch.einsum("ngk,ogk->nog", xg, wg)
        top = wg.abs().amax(-1)  # [o, G]
        best_err, best = torch.full_like(top, float("inf")), top.clone()
        for i in range(int(max_shrink * grid)):
            m = top * (1 - i / grid)
            cur = torch.maximum(torch.minimum(w1, _expand(m, spec, w1)), -_expand(m, spec, w1))
            q = grouped(_qdq(cur, spec), spec.group_size)
            err = (torch.einsum("ngk,ogk->nog", xg, q) - ref).square().mean(0)
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, m, best)
        out.append(best)
    return torch.cat(out)


def _expand(m: Tensor, spec: QuantSpec, like: Tensor) -> Tensor:
    """``[d_out, n_groups]`` → ``[d_out, d_in]``, each group's value repeated over its columns."""
    return m.repeat_interleave(spec.group_len(like.shape[1]), dim=1)


def _fold(prev: nn.Module, s: Tensor) -> None:
    """``prev``'s output divided by ``s`` (a norm's weight, or a linear's rows and bias)."""
    prev.weight.div_(s.view(-1, *([1] * (prev.weight.dim() - 1))).to(prev.weight.dtype))
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s.to(prev.bias.dtype))


def _sample(xs: list[Tensor], n: int, gen: torch.Generator) -> Tensor:
    x = torch.cat(xs)
    return x if len(x) <= n else x[torch.randperm(len(x), generator=gen)[:n]]


@torch.no_grad()
def awq_weights(spec: QuantSpec, model: nn.Module, targets: dict[str, nn.Linear], calib_ids: Tensor,
                grid: int = 20, tokens: int = 4096, seed: int = 0) -> tuple[dict[str, Tensor], dict]:
    """Scale the model in place (an equivalent fp model) and return the clipped weights the rounding
    should see (one per target) and a report (the mean α chosen per kind of input)."""
    found = _block_list(model, list(targets))
    if found is None:
        raise ValueError("quant.awq=true needs the targets inside one list of decoder blocks")
    list_name, blocks = found
    device = next(model.parameters()).device
    inputs = _first_block_inputs(model, blocks[0], calib_ids.to(device))
    gen = torch.Generator().manual_seed(seed)
    pre: dict[str, Tensor] = {}
    alphas: dict[str, list[float]] = {}
    for i, block in enumerate(tqdm(blocks, desc=f"AWQ ({len(calib_ids)} calibration sequences)", leave=False)):
        prefix = f"{list_name}.{i}."
        mods = dict(block.named_modules())
        groups = [(p, cs) for p, cs in GROUPS if any(prefix + c in targets for c in cs)]
        missing = [n for p, cs in groups for n in (p, *cs) if n not in mods]
        if missing:
            raise ValueError(f"quant.awq=true: block {prefix.rstrip('.')} has no {', '.join(missing)} "
                             "(AWQ's scaling knows Llama-style blocks: q/k/v/o, gate/up/down, two RMSNorms)")
        seen: dict[str, list[Tensor]] = {cs[0]: [] for _, cs in groups}
        hooks = [mods[c].register_forward_hook(
            lambda m, a, o, xs=seen[c]: xs.append(a[0].detach().reshape(-1, a[0].shape[-1]).to(OFFLOAD)))
            for c in seen]
        try:
            for j, (args, kwargs) in enumerate(inputs):  # the fp block: its inputs, and the next block's
                out = _hidden(block(*_to(args, device), **_to(kwargs, device)))
                inputs[j] = ((out.to(OFFLOAD), *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states":
                                                                                      out.to(OFFLOAD)})
        finally:
            for h in hooks:
                h.remove()
        xs: dict[str, Tensor] = {}
        for prev, consumers in groups:  # all of the block's scales first, folded (as the released code) ...
            lins = [mods[c] for c in consumers]
            x = _sample(seen[consumers[0]], tokens, gen).to(device)
            # v_proj -> o_proj under grouped-query attention: no one-to-one fold, so no scaling (clip only)
            if not (isinstance(mods[prev], nn.Linear) and mods[prev].out_features != lins[0].in_features):
                s, alpha = search_scale(x, [m.weight for m in lins], spec, grid)
                alphas.setdefault(prev, []).append(alpha)
                _fold(mods[prev], s)
                for m in lins:
                    m.weight.mul_(s.to(m.weight.dtype))
                x = x / s
            xs[consumers[0]] = x[torch.randperm(len(x), generator=gen)[:CLIP_TOKENS].to(x.device)]
        for _, consumers in groups:  # ... then the clip of every target on its final (scaled, folded) weight
            for c in consumers:
                if prefix + c in targets:
                    w = mods[c].weight.detach()
                    if c.rsplit(".", 1)[-1] not in NO_CLIP:
                        lim = _expand(search_clip(xs[consumers[0]], w, spec, grid), spec, w).to(w.dtype)
                        w = torch.maximum(torch.minimum(w, lim), -lim)
                    pre[prefix + c] = w.clone()
    return pre, {"awq_alpha": {k: sum(v) / len(v) for k, v in alphas.items()}}  # mean α per input
