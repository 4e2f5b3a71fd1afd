"""Next-token cross-entropy with chunked lm_head logits, shared by training (romer.builtin.train) and
evaluation (romer.evaluation.measure)."""

from __future__ import annotations

import torch.nn.functional as F


def chunked_lm_loss(lm_head, hidden: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
                    chunk_bytes: int = 16 << 20):
    """Next-token cross-entropy (mean or sum), with the lm_head logits computed a chunk of tokens
    at a time. Same value as cross_entropy over the full [tokens, vocab] logits.

    The point is speed on CPU: glibc serves allocations of 32 MiB and more with fresh mmap()s, so
    full-batch logits (8 x 256 x 4096 float32 = 32 MiB, plus their log-softmax and gradients)
    page-fault anew on every step (measured: ~20k page faults and ~9% of the time per step).
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    n = max(1, chunk_bytes // (4 * lm_head.out_features))
    total = 0.0
    for hs, ts in zip(h.split(n), t.split(n)):
        total = total + F.cross_entropy(lm_head(hs).float(), ts, reduction="sum")
    return total / t.numel() if reduction == "mean" else total
