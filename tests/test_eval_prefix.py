"""eval.prefix_cache: a shared prompt prefix runs once, and the logits are those of the plain forward."""

from __future__ import annotations

import pytest
import torch

from qexp import models
from qexp.eval.lmeval import accuracy
from qexp.eval.prefix import PrefixCache, common_prefix
from tests.conftest import make_cfg, tiny_llama


def test_common_prefix():
    assert common_prefix(torch.tensor([[1, 2, 3, 4], [1, 2, 5, 4]])) == 2
    assert common_prefix(torch.tensor([[7, 2], [1, 2]])) == 0
    assert common_prefix(torch.tensor([[1, 2, 3]])) == 3


def test_logits_equal_the_plain_forward_and_the_prefix_runs_once():
    model = tiny_llama(vocab=128)
    torch.manual_seed(1)
    prefix = torch.randint(0, 128, (20,))
    cache = PrefixCache(model, min_len=8)

    def batch(b: int, t: int) -> torch.Tensor:
        return torch.cat([prefix.expand(b, -1), torch.randint(0, 128, (b, t))], dim=1)

    for inps in (batch(3, 7), batch(2, 11), batch(1, 1)):  # later batches reuse the first one's prefix
        with torch.no_grad():
            torch.testing.assert_close(cache.logits(inps), model(inps).logits, rtol=1e-5, atol=1e-5)
    assert (cache.misses, cache.hits) == (1, 2) and len(cache.tokens) == 20
    other = torch.randint(0, 128, (2, 30))
    other[:, 0] = torch.tensor([1, 2])  # no shared prefix: the plain forward, the cache untouched
    with torch.no_grad():
        torch.testing.assert_close(cache.logits(other), model(other).logits, rtol=1e-5, atol=1e-5)
        same = batch(1, 3).expand(2, -1)  # identical rows: the last token still runs (its logits are read)
        torch.testing.assert_close(cache.logits(same), model(same).logits, rtol=1e-5, atol=1e-5)
        assert (cache.misses, cache.hits) == (1, 3)
        short = batch(1, 0).expand(2, -1)  # the cached prefix is the whole row: a new, shorter one
        torch.testing.assert_close(cache.logits(short), model(short).logits, rtol=1e-5, atol=1e-5)
    assert (cache.misses, cache.hits, len(cache.tokens)) == (2, 3, 19)


@pytest.mark.parametrize("start", [1, 12, 20, 25, 99])
def test_logits_from_a_start_position_equal_the_plain_forwards_tail(start):
    """Only the positions lm-eval scores: before, inside and after the cached prefix, and past the end."""
    model = tiny_llama(vocab=128)
    torch.manual_seed(2)
    prefix = torch.randint(0, 128, (20,))
    cache = PrefixCache(model, min_len=8)
    for inps in (torch.cat([prefix.expand(3, -1), torch.randint(0, 128, (3, 9))], dim=1),  # miss, then hit
                 torch.cat([prefix.expand(2, -1), torch.randint(0, 128, (2, 6))], dim=1),
                 torch.randint(0, 128, (2, 30))):  # no shared prefix: the plain forward
        with torch.no_grad():
            want = model(inps).logits[:, min(start, inps.shape[1] - 1):]
            torch.testing.assert_close(cache.logits(inps, start), want, rtol=1e-5, atol=1e-5)
    assert (cache.misses, cache.hits) == (1, 1)


def test_prefix_lm_loglikelihoods_equal_hflm_on_multi_token_continuations():
    """PrefixLM against lm-eval's own HFLM on the embedded model: contexts that share a prefix, multi-token
    continuations (two that share their first token), and one context shorter than the rest."""
    from lm_eval.models.huggingface import HFLM

    from qexp.eval.prefix import PrefixLM

    cfg = make_cfg("model=smollm2_135m")
    model, tok = models.load(cfg.model, cfg.cache_dir)
    g = torch.Generator().manual_seed(0)

    def toks(n: int) -> list[int]:
        return torch.randint(100, 20000, (n,), generator=g).tolist()

    shared, first = toks(70), toks(1)
    reqs = [(("", ""), shared + toks(3 + i), toks(1 + i % 4)) for i in range(9)]
    reqs += [(("", ""), [*shared, 7, 8], first + toks(3)), (("", ""), [*shared, 7, 8], first + toks(2))]
    plain = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu")
    lm = PrefixLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu")
    lm.prefix = PrefixCache(model)
    # scored from position 71 (past the cached prefix), then from 4 (a 5-token context: prefix logits kept)
    for call, start in ((reqs, 71), ([*reqs, (("", ""), toks(5), toks(3))], 4)):
        want, got = plain._loglikelihood_tokens(call), lm._loglikelihood_tokens(call)
        assert lm.start == start
        assert [g[1] for g in got] == [w[1] for w in want]
        torch.testing.assert_close(torch.tensor([g[0] for g in got]), torch.tensor([w[0] for w in want]),
                                   rtol=1e-4, atol=1e-4)
    assert lm.prefix.hits >= 2  # the shared prefix went through the cache


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_accuracy_items_equal_without_the_cache(dtype):
    """MMLU 5-shot on the embedded model, fp32 and bf16: the same per-item scores with and without the cache."""
    got = {}
    for on in (True, False):
        cfg = make_cfg("model=smollm2_135m", f"model.dtype={dtype}", "eval=embedded", "eval.limit=6",
                       "eval.tasks=[qexp_mmlu]", f"eval.prefix_cache={on}", "eval.lm_eval_batch_size=4")
        model, tok = models.load(cfg.model, cfg.cache_dir)
        got[on] = accuracy(model, tok, cfg.eval, cfg.cache_dir)
    assert got[True][1]["items"] == got[False][1]["items"]
    info = got[True][1]["tasks"]["qexp_mmlu"]["prefix_cache"]
    assert info["misses"] >= 1 and info["hits"] >= 1 and info["tokens"] >= 300  # the 5 exemplars
    assert "prefix_cache" not in got[False][1]["tasks"]["qexp_mmlu"]
