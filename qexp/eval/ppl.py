"""Token-level perplexity as the papers compute it (GPTQ / LR-QAT protocol).

The test text is concatenated and tokenized once, cut into non-overlapping windows of
``seqlen`` tokens, and perplexity is ``exp(mean NLL)`` over every predicted token
(``seqlen - 1`` per window, the first token of a window has no context). GPTQ's C4 protocol
passes its random windows ``[n, seqlen]`` directly (:func:`qexp.data.random_windows`); the mean
is the same. This is not lm-eval's ``wikitext`` task, which reports word-level perplexity.

Each window's mean NLL is returned too (``window_nll``, rounded to 4 decimals: a few bytes per
window), so the analysis can bootstrap over windows (:mod:`qexp.analysis.uncertainty`); every window
scores the same number of tokens, so their mean is the overall ``nll``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model: nn.Module, ids: Tensor, seqlen: int, max_windows: int | None = None,
               batch_size: int = 4) -> dict[str, Any]:
    """``{"ppl", "nll", "windows", "tokens", "seqlen", "window_nll"}`` over the first ``max_windows`` windows.

    ``ids``: a 1-D token stream (cut into non-overlapping windows) or ``[n, seqlen]`` windows.
    ``tokens`` counts the scored tokens: ``windows * (seqlen - 1)``.
    """
    if ids.dim() == 2:
        if ids.shape[1] != seqlen:
            raise ValueError(f"windows have {ids.shape[1]} tokens, expected seqlen={seqlen}")
        n = len(ids) if max_windows is None else min(len(ids), max_windows)
        windows = ids[:n]
    else:
        n = len(ids) // seqlen if max_windows is None else min(len(ids) // seqlen, max_windows)
        windows = ids[: n * seqlen].view(n, seqlen)
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    device = next(model.parameters()).device
    per_window: list[float] = []
    for batch in tqdm(windows.split(batch_size), desc=f"perplexity ({n} windows of {seqlen})", leave=False):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
        per_window += nll.view(len(batch), -1).double().mean(1).tolist()
    mean = math.fsum(per_window) / n
    return {"ppl": math.exp(mean), "nll": mean, "windows": n, "tokens": n * (seqlen - 1), "seqlen": seqlen,
            "window_nll": [round(x, 4) for x in per_window]}
