"""SmoothQuant (Xiao et al., ICML 2023) as a stage of the base (``quant.smoothquant=true|alpha``).

Activation outliers sit in a few input channels. Per channel ``j`` of a normalization's output,
``s_j = max|X_j|^α / max|W_{:,j}|^(1−α)`` moves quantization difficulty from the activations to
the weights: the norm's weight is divided by ``s`` and every linear reading that norm's output has
its input columns multiplied by ``s``. The fp model computes the same function (up to rounding);
the activations the quantizer of ``quant.act_bits`` sees are flatter. As SmoothQuant does for
Llama-style blocks: ``input_layernorm`` → q/k/v and ``post_attention_layernorm`` → gate/up
(o_proj and down_proj read no norm and are not smoothed). ``max|X_j|`` comes from the calibration
sequences (``data.calib``, ``quant.calib_samples``) on the fp model, before any weight changes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ConfigError

PAIRS = (("input_layernorm", "self_attn", ("q_proj", "k_proj", "v_proj")),
         ("post_attention_layernorm", "mlp", ("gate_proj", "up_proj")))


def _groups(model: nn.Module) -> list[tuple[nn.Module, list[nn.Linear]]]:
    """(norm, the linears that read its output) of every decoder block."""
    out = []
    for block in model.modules():
        for norm_name, parent_name, lin_names in PAIRS:
            norm, parent = getattr(block, norm_name, None), getattr(block, parent_name, None)
            if norm is None or parent is None:
                continue
            lins = [getattr(parent, n, None) for n in lin_names]
            if all(isinstance(m, nn.Linear) for m in lins) and isinstance(getattr(norm, "weight", None), Tensor):
                out.append((norm, lins))
    if not out:
        raise ConfigError("quant.smoothquant needs Llama-style blocks (input_layernorm -> self_attn.q/k/v_proj, "
                          "post_attention_layernorm -> mlp.gate/up_proj); this model has none: set "
                          "quant.smoothquant=false")
    return out


def smoothing_scales(act_max: Tensor, weights: list[Tensor], alpha: float) -> Tensor:
    """``s_j = max|X_j|^α / max_i|W_ij|^(1−α)`` over every linear reading the channel (fp32)."""
    w_max = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0).clamp(min=1e-5)
    return (act_max.float().clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def smooth(model: nn.Module, calib_ids: Tensor, alpha: float, batch: int = 8) -> dict:
    """Smooth every norm → linears group of ``model`` in place; return what the record states."""
    groups = _groups(model)
    act_max: dict[int, Tensor] = {}

    def hook(i: int):
        def fn(module: nn.Module, args: tuple, out: Tensor) -> None:
            m = out.detach().abs().reshape(-1, out.shape[-1]).amax(0).float()
            act_max[i] = m if i not in act_max else torch.maximum(act_max[i], m)
        return fn

    handles = [norm.register_forward_hook(hook(i)) for i, (norm, _) in enumerate(groups)]
    try:
        device = next(model.parameters()).device
        for ids in calib_ids.split(batch):
            model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    ratios = []
    for i, (norm, lins) in enumerate(groups):
        s = smoothing_scales(act_max[i], [lin.weight for lin in lins], alpha)
        norm.weight.copy_((norm.weight.float() / s).to(norm.weight.dtype))
        for lin in lins:
            lin.weight.copy_((lin.weight.float() * s).to(lin.weight.dtype))
        ratios.append(float(s.max() / s.min()))
    return {"alpha": alpha, "groups": len(groups), "calib_sequences": int(calib_ids.shape[0]),
            "scale_max_over_min": round(max(ratios), 3)}
