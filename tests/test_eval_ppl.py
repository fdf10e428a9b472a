"""Perplexity protocols: exact values on models with known logits, window layout, scored-token counts."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qexp.config import SourceConfig
from qexp.data import eval_tokens, random_windows
from qexp.eval import perplexity

V = 11


class Uniform(nn.Module):
    """Zero logits: every token has probability 1/vocab, so perplexity is exactly vocab."""

    def __init__(self, vocab: int = V) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.vocab = vocab
        self.seen: list[torch.Tensor] = []

    def forward(self, input_ids):
        self.seen.append(input_ids.clone())
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


class Bigram(nn.Module):
    """Logits depend on the previous token only (a fixed random table), so the NLL of every
    (previous, next) pair is known in closed form."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(seed)) * 3)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[input_ids])


def test_uniform_logits_give_vocab_size():
    ids = torch.randint(0, V, (1000,))
    r = perplexity(Uniform(), ids, seqlen=64)
    assert r["ppl"] == pytest.approx(V, rel=1e-6)
    assert r["nll"] == pytest.approx(math.log(V), rel=1e-6)


def test_windows_do_not_overlap_and_tail_is_dropped():
    model = Uniform(vocab=1000)
    r = perplexity(model, torch.arange(1000), seqlen=64, batch_size=3)
    seen = torch.cat(model.seen)
    assert seen.shape == (1000 // 64, 64)  # 15 whole windows; the last 40 tokens are not scored
    assert torch.equal(seen.flatten(), torch.arange(15 * 64))  # consecutive, non-overlapping, in order
    assert r["windows"] == 15 and r["tokens"] == 15 * 63  # the first token of each window is not predicted


def test_max_windows_takes_the_first_windows():
    model = Uniform(vocab=1000)
    r = perplexity(model, torch.arange(1000), seqlen=64, max_windows=4)
    assert torch.equal(torch.cat(model.seen).flatten(), torch.arange(4 * 64))
    assert r["windows"] == 4 and r["tokens"] == 4 * 63


def test_exact_mean_nll_over_predicted_tokens_only():
    """Brute force over the pairs the protocol scores: (i, i+1) inside a window, never across."""
    torch.manual_seed(1)
    ids = torch.randint(0, V, (517,))
    seqlen = 50
    model = Bigram()
    logp = F.log_softmax(model.table.detach().double(), dim=-1)
    pairs = [(ids[i], ids[i + 1]) for i in range(10 * seqlen - 1) if i % seqlen != seqlen - 1]
    expected = -sum(logp[a, b].item() for a, b in pairs) / len(pairs)
    r = perplexity(model, ids, seqlen=seqlen, batch_size=4)
    assert r["tokens"] == len(pairs) == 10 * 49
    assert r["nll"] == pytest.approx(expected, rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
    # scoring across window boundaries (a sliding/overlapping protocol) would give another number
    across = -sum(logp[ids[i], ids[i + 1]].item() for i in range(10 * seqlen - 1)) / (10 * seqlen - 1)
    assert abs(across - expected) > 1e-4


def test_per_window_nll_is_each_windows_own_mean():
    """window_nll[i] is window i's mean NLL (brute force), rounded to 4 decimals; their mean is nll."""
    torch.manual_seed(2)
    ids = torch.randint(0, V, (6 * 40,))
    model = Bigram()
    logp = F.log_softmax(model.table.detach().double(), dim=-1)
    r = perplexity(model, ids, seqlen=40, batch_size=4)  # 4 + 2: a ragged last batch
    w = ids.view(6, 40)
    expected = [-sum(logp[w[k, i], w[k, i + 1]].item() for i in range(39)) / 39 for k in range(6)]
    assert len(r["window_nll"]) == r["windows"] == 6
    assert r["window_nll"] == [round(x, 4) for x in r["window_nll"]]
    assert r["window_nll"] == pytest.approx(expected, abs=6e-5)
    assert len(set(r["window_nll"])) == 6  # not one number repeated
    assert sum(r["window_nll"]) / 6 == pytest.approx(r["nll"], abs=1e-4)


def test_windows_given_as_a_matrix_are_scored_as_is():
    windows = torch.randint(0, V, (7, 32))
    r = perplexity(Bigram(), windows, seqlen=32, max_windows=5)
    assert r["windows"] == 5 and r["tokens"] == 5 * 31
    assert r["nll"] == pytest.approx(perplexity(Bigram(), windows[:5].flatten(), seqlen=32)["nll"], rel=1e-6)
    with pytest.raises(ValueError, match="seqlen=16"):
        perplexity(Bigram(), windows, seqlen=16)


class WordTok:
    """A tokenizer stand-in: one id per whitespace-separated word (ids are the word's integer)."""

    def __call__(self, text, add_special_tokens=True):
        return SimpleNamespace(input_ids=[int(w) for w in text.split()])


def _gptq_c4_reference(docs: list[str], tok, seqlen: int, n: int) -> torch.Tensor:
    """GPTQ's get_c4 validation loop, as published (module-level random, seed 0)."""
    random.seed(0)
    out = []
    for _ in range(n):
        while True:
            i = random.randint(0, len(docs) - 1)
            ids = tok(docs[i]).input_ids
            if len(ids) >= seqlen:
                break
        i = random.randint(0, len(ids) - seqlen - 1)
        out.append(ids[i:i + seqlen])
    return torch.tensor(out)


def test_random_windows_follow_gptq_c4():
    rng = random.Random(3)
    # documents of 5..80 tokens, none of exactly seqlen tokens (GPTQ's randint would fail there)
    lengths = [rng.choice([n for n in range(5, 80) if n != 32]) for _ in range(200)]
    docs = [" ".join(str(1000 * d + k) for k in range(n)) for d, n in enumerate(lengths)]
    w = random_windows(docs, WordTok(), seqlen=32, n=40)
    assert w.shape == (40, 32)
    assert torch.equal(w, _gptq_c4_reference(docs, WordTok(), 32, 40))
    for row in w.tolist():  # each window is a contiguous slice of one document longer than seqlen
        d, k = divmod(row[0], 1000)
        assert lengths[d] > 32 and row == [1000 * d + k + j for j in range(32)]
    # the first windows do not depend on how many are drawn
    assert torch.equal(random_windows(docs, WordTok(), 32, 8), w[:8])


def test_eval_tokens_protocols(monkeypatch):
    docs = [" ".join(str(i) for i in range(k, k + 40)) for k in range(0, 4000, 40)]
    monkeypatch.setattr("qexp.data.documents", lambda src: docs)
    concat = eval_tokens(SourceConfig(name="x"), WordTok(), seqlen=16, max_windows=None)
    assert concat.dim() == 1 and len(concat) == 4000
    src = SourceConfig(name="x", ppl_protocol="random_windows", ppl_windows=256)
    assert eval_tokens(src, WordTok(), seqlen=16, max_windows=8).shape == (8, 16)  # capped by max_windows
    assert eval_tokens(src, WordTok(), seqlen=16, max_windows=None).shape == (256, 16)
