"""Token-level perplexity as the papers compute it (GPTQ / LR-QAT protocol).

The test text is concatenated and tokenized once, cut into non-overlapping windows of
``seqlen`` tokens, and perplexity is ``exp(mean NLL)`` over every predicted token
(``seqlen - 1`` per window, the first token of a window has no context). This is not
lm-eval's ``wikitext`` task, which reports word-level perplexity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def perplexity(model: nn.Module, ids: Tensor, seqlen: int, max_windows: int | None = None,
               batch_size: int = 4) -> dict[str, float]:
    """``{"ppl", "nll", "windows", "tokens", "seqlen"}`` over the first ``max_windows`` windows."""
    n = len(ids) // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of seqlen={seqlen}")
    windows = ids[: n * seqlen].view(n, seqlen)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += batch[:, 1:].numel()
    mean = total / count
    return {"ppl": math.exp(mean), "nll": mean, "windows": n, "tokens": count, "seqlen": seqlen}
