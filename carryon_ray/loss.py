"""Next-token cross entropy on target tokens only, without materializing full logits.

The vocabulary projection dominates memory: B x T x V floats for SmolLM2 at batch 8 x 256 is
400 MB in fp32, and autograd would keep it for the backward pass. We therefore (1) gather only
the positions whose next token is a target (prompt tokens never reach the head), and (2) project
them in chunks, each chunk recomputed in the backward pass (activation checkpointing), so at most
one chunk x V logits tensor exists at any time.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .rows import IGNORE  # noqa: F401  (the label of tokens that carry no loss; numpy-only home)


def select_targets(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift for next-token prediction and keep scored positions: ([N, D], [N])."""
    h, y = x[:, :-1], labels[:, 1:].to(x.device)
    keep = y != IGNORE
    return h[keep], y[keep]


def _chunk_ce(head: Callable, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), y, reduction="sum")


def chunked_cross_entropy(
    head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, y: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """Sum of token cross entropies of head(h) against y, computed `chunk` rows at a time."""
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk):
        hc, yc = h[i : i + chunk], y[i : i + chunk]
        if torch.is_grad_enabled() and hc.requires_grad:
            total = total + checkpoint(_chunk_ce, head, hc, yc, use_reentrant=False)
        else:
            total = total + _chunk_ce(head, hc, yc)
    return total


def _chunk_kl(head: Callable, h_base: torch.Tensor, h: torch.Tensor, top_k: int | None,
              base_head: Callable) -> torch.Tensor:
    with torch.no_grad():
        base_logp = torch.log_softmax(base_head(h_base).float(), -1)
    logq = torch.log_softmax(head(h).float(), -1)
    if top_k is None:
        p = base_logp.exp()
        return (p * (base_logp - logq)).sum()
    # Both distributions renormalised over the base's top-k tokens: KL between those restrictions.
    top, idx = base_logp.topk(top_k, -1)
    top = top - torch.logsumexp(top, -1, keepdim=True)
    q = logq.gather(-1, idx)
    q = q - torch.logsumexp(q, -1, keepdim=True)
    return (top.exp() * (top - q)).sum()


def chunked_kl_to_base(head: Callable[[torch.Tensor], torch.Tensor], h_base: torch.Tensor, h: torch.Tensor,
                       chunk: int = 1024, top_k: int | None = None,
                       base_head: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Sum over positions of KL(softmax(base_head(h_base)) || softmax(head(h))): how far the carry-on
    moved the base's next-token distribution. `base_head` (default `head`) is the base's own head when
    `head` carries a correction. Zero exactly when h == h_base and the heads agree (alpha = 0)."""
    base_head = head if base_head is None else base_head
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk):
        hb, hc = h_base[i : i + chunk], h[i : i + chunk]
        if torch.is_grad_enabled() and hc.requires_grad:
            total = total + checkpoint(_chunk_kl, head, hb, hc, top_k, base_head, use_reentrant=False)
        else:
            total = total + _chunk_kl(head, hb, hc, top_k, base_head)
    return total
