"""Reuse the keys/values of a prompt prefix that every scoring forward shares (``eval.prefix_cache``).

A few-shot task puts the same description and exemplars before every item: on MMLU 5-shot with the
offline pack they are its first 375 tokens, most of an item, so lm-eval's plain forwards spend most of
the pass on tokens they have already seen. :class:`PrefixCache` runs the batch's common prefix once, keeps
its keys/values and logits, and for each later batch that starts with the same tokens runs only the
rest on a copy of that cache. It returns ``model(inps).logits`` (the same numbers up to float summation
order) from the first position that any request of lm-eval's call scores: before it, the rows hold only
context, whose logits lm-eval would put through a log-softmax over the vocabulary and then drop. The
positions are dropped before the LM head (``logits_to_keep``), and lm-eval, which reads a shorter logits
row as leading virtual tokens, takes each continuation's log-probs from the right positions.

Only lm-eval's multiple-choice / loglikelihood forwards use it (no attention mask: causal models,
right padding); generation keeps lm-eval's own path. Every qexp quantizer is per token (activations,
K/V) or fixed, so splitting a sequence does not change what it computes.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM
from torch import nn


def common_prefix(inps: torch.Tensor) -> int:
    """Length of the token prefix that every row of ``inps`` [batch, seq] shares."""
    same = (inps == inps[:1]).all(dim=0)
    return int(same.long().cumprod(0).sum())


class PrefixCache:
    """Logits of ``model`` on batches that share a prefix, the prefix run once (``min_len`` tokens at least)."""

    def __init__(self, model: nn.Module, min_len: int = 64):
        self.model, self.min_len = model, min_len
        self.tokens: torch.Tensor | None = None  # the cached prefix
        self.kv: Any = None
        self.logits_: torch.Tensor | None = None
        self.hits = self.misses = 0
        # transformers >= 5.2x names the cache argument and output `cache`, earlier `past_key_values`
        self.kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    def _forward(self, inps: torch.Tensor, keep: int, **kw: Any) -> torch.Tensor:
        """The logits of the last ``keep`` positions of ``inps`` (the LM head runs on those only)."""
        if self.keep:
            return self.model(inps, logits_to_keep=keep, **kw).logits
        return self.model(inps, **kw).logits[:, -keep:]

    def logits(self, inps: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``model(inps).logits[:, start:]``, reusing the cached prefix's keys/values when ``inps`` starts with it."""
        b, t = inps.shape
        start = min(start, t - 1)
        p = min(common_prefix(inps), t - 1)  # at least one new token per forward
        n = 0 if self.tokens is None else len(self.tokens)
        if n and n <= p and torch.equal(inps[0, :n], self.tokens):
            self.hits += 1
        elif p >= self.min_len:
            out = self.model(inps[:1, :p], use_cache=True)
            self.tokens, self.kv, self.logits_ = inps[0, :p].clone(), getattr(out, self.kw), out.logits
            self.misses += 1
        else:
            return self._forward(inps, t - start)
        n = len(self.tokens)
        kv = copy.deepcopy(self.kv)
        kv.batch_repeat_interleave(b)
        rest = self._forward(inps[:, n:], t - max(start, n), use_cache=True, **{self.kw: kv})
        if start >= n:
            return rest
        return torch.cat([self.logits_[:, start:].expand(b, -1, -1).to(rest.dtype), rest], dim=1)


class PrefixLM(HFLM):
    """lm-eval's HFLM whose loglikelihood forwards go through a :class:`PrefixCache` (``prefix``; set a
    fresh one per task); seq2seq calls (mask or labels) keep HFLM's own path."""

    prefix: PrefixCache | None = None
    start = 0  # the first position that any request of the current call scores

    def _loglikelihood_tokens(self, requests: list, *args: Any, **kwargs: Any) -> list:
        """HFLM's, after noting the first scored position: a row of context + continuation (left-truncated
        to ``max_length + 1``, the last token dropped) scores its last ``len(continuation)`` positions."""
        firsts = [min(len(ctx) + len(cont), self.max_length + 1) - 1 - len(cont) for _, ctx, cont in requests]
        self.start = max(min(firsts, default=0), 0)
        return super()._loglikelihood_tokens(requests, *args, **kwargs)

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.prefix is None or attn_mask is not None or labels is not None:
            return super()._model_call(inps, attn_mask, labels)
        amp = self.mixed_precision_dtype
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=amp, enabled=amp is not None):
            return self.prefix.logits(inps, self.start)
