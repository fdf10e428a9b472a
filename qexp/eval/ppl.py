"""Token-level perplexity as the papers compute it (GPTQ / LR-QAT protocol).

The test text is concatenated and tokenized once, cut into non-overlapping windows of
``seqlen`` tokens, and perplexity is ``exp(mean NLL)`` over every predicted token
(``seqlen - 1`` per window, the first token of a window has no context). GPTQ's C4 protocol
passes its random windows ``[n, seqlen]`` directly (:func:`qexp.data.random_windows`); the mean
is the same. This is not lm-eval's ``wikitext`` task, which reports word-level perplexity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model: nn.Module, ids: Tensor, seqlen: int, max_windows: int | None = None,
               batch_size: int = 4) -> dict[str, float]:
    """``{"ppl", "nll", "windows", "tokens", "seqlen"}`` over the first ``max_windows`` windows.

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
    total, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc=f"perplexity ({n} windows of {seqlen})", leave=False):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += batch[:, 1:].numel()
    mean = total / count
    return {"ppl": math.exp(mean), "nll": mean, "windows": n, "tokens": count, "seqlen": seqlen}
