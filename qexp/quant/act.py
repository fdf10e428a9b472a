"""Weight-activation-KV quantization (LR-QAT Table 5's W4A8, W4A8KV4, W4A4; methods.md §3.3).

- ``quant.act_bits``: dynamic asymmetric per-token fake quantization of the INPUT of every target
  linear (each token's min/max over its features gives the scale and integer zero, at every
  forward), in training (straight-through gradient) and evaluation, whatever the method's layer.
  A forward pre-hook on each target module does it; :func:`qexp.models.set_module` hands the hook
  on to the module that replaces it (the merge), so training, merge check and every evaluation
  stage after attach see the same quantizer. The fp reference stage (``eval.fp_reference``) is
  measured before the hooks go on: it stays 16-16-16.
- ``quant.kv_bits``: the same per-token quantizer on K and V per attention head (over ``head_dim``),
  after RoPE: what a KV cache stores. It wraps the model's attention function (transformers'
  ``AttentionInterface``), so the cache's contents and the training attention are quantized alike.
- 16 bits: nothing is installed, an exact no-op.

Weights stay as the method makes them; lm_head and embeddings stay fp (LR-QAT's
``FP_head_embd_norm``). The export files hold weights only: the activation quantizers are not
written (``qexp.config`` refuses ``export.formats`` with act/kv bits below 16).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn

ACT_BITS = (4, 6, 8, 16)


class _RoundSTE(torch.autograd.Function):
    """Fake quantization with an identity gradient (the value is the quantized one, bit for bit)."""

    @staticmethod
    def forward(ctx, x: Tensor, xq: Tensor) -> Tensor:
        return xq

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:
        return g, None


@torch.no_grad()
def quantize_tokens(x: Tensor, bits: int) -> Tensor:
    """Asymmetric per-token (last dimension) min/max quantization to ``bits``, dequantized, in
    ``x``'s dtype (the grid math in fp32). ``bits >= 16`` returns ``x`` itself."""
    if bits >= 16:
        return x
    xf = x.float()
    lo, hi = xf.amin(-1, keepdim=True).clamp(max=0), xf.amax(-1, keepdim=True).clamp(min=0)
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    zero = torch.round(-lo / scale)
    q = (torch.round(xf / scale) + zero).clamp_(0, qmax)
    return ((q - zero) * scale).to(x.dtype)


def fake_quant_tokens(x: Tensor, bits: int) -> Tensor:
    """:func:`quantize_tokens` with a straight-through gradient (LR-QAT's dynamic activation quantizer)."""
    if bits >= 16:
        return x
    return _RoundSTE.apply(x, quantize_tokens(x, bits))


def _input_hook(bits: int) -> Callable:
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (fake_quant_tokens(args[0], bits), *args[1:])

    return hook


def _kv_attention(bits: int, inner: str) -> Callable:
    """The model's attention function ``inner`` with K and V quantized per token and head."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, *args, **kwargs):
        fn = ALL_ATTENTION_FUNCTIONS[inner] if inner in ALL_ATTENTION_FUNCTIONS else \
            sys.modules[type(module).__module__].eager_attention_forward
        return fn(module, query, fake_quant_tokens(key, bits), fake_quant_tokens(value, bits), *args, **kwargs)

    return attention


def install(model: nn.Module, target_names: list[str], act_bits: int, kv_bits: int) -> dict:
    """Put the activation quantizer on the inputs of the modules named ``target_names`` and the KV
    quantizer into the model's attention; return what the record states (``quant_act``)."""
    if act_bits < 16:
        for name in target_names:
            model.get_submodule(name).register_forward_pre_hook(_input_hook(act_bits))
    out = {"act_bits": act_bits, "kv_bits": kv_bits,
           "act": ("none" if act_bits >= 16 else
                   f"dynamic asymmetric per-token INT{act_bits} on the inputs of {len(target_names)} target linears "
                   "(straight-through gradient); lm_head, embeddings, norms and attention scores fp")}
    if kv_bits < 16:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        inner = model.config._attn_implementation or "eager"
        name = f"qexp_kv{kv_bits}_{inner}"
        AttentionInterface.register(name, _kv_attention(kv_bits, inner))
        mask = inner if inner in ALL_MASK_ATTENTION_FUNCTIONS else "sdpa"
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask])
        model.set_attn_implementation(name)
        out["kv"] = (f"dynamic asymmetric per-token per-head INT{kv_bits} on K (after RoPE) and V, inside the "
                     f"attention ({inner})")
    else:
        out["kv"] = "none"
    return out
