"""Inference side of the pipeline: token batch -> base hidden states -> bridge codes.

`embed_batch` is what an embedding actor runs (and what the in-process trainer and the
benchmarks run); `decode_sources` is its inverse on the training side. Encoded batches are plain
dicts of CPU tensors so they travel through Ray's object store without pickling code.
"""

from __future__ import annotations

import torch

from .base import FrozenBase
from .bridge import Bridges, fit_bridges
from .config import BridgeConfig


def source_key(base: int, source: int, part: str) -> str:
    return f"s{base}_{source}_{part}"


def embed_batch(
    bases: list[FrozenBase], bridges: Bridges, input_ids: torch.Tensor, attention_mask: torch.Tensor, shallow: list[int]
) -> dict[str, torch.Tensor]:
    """Run every base on one padded token batch; return bridge-encoded sources (on CPU)."""
    out: dict[str, torch.Tensor] = {}
    for b, base in enumerate(bases):
        states, _ = base.hidden_states(input_ids, attention_mask, shallow)
        for i, s in enumerate(states):
            for part, t in bridges[b][i].encode(s).items():
                out[source_key(b, i, part)] = t.cpu()
    return out


def calibrate_bridges(
    bases: list[FrozenBase], cfg: BridgeConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    shallow: list[int],
) -> Bridges:
    """Fit the bridges (channel scales, optional PCA) on the real tokens of one batch."""
    keep = attention_mask.bool()
    calib = []
    for base in bases:
        states, _ = base.hidden_states(input_ids, attention_mask, shallow)
        calib.append([s[keep.to(s.device)][: cfg.calibration_tokens].float().cpu() for s in states])
    return fit_bridges(cfg, calib)


def decode_sources(
    bridges: Bridges, enc: dict[str, torch.Tensor], dims: list[list[int]], dtype=torch.float32, device=None
) -> list[list[torch.Tensor]]:
    """Inverse of `embed_batch`: list over bases of [deep, shallow...] float tensors."""
    sources = []
    for b, base_dims in enumerate(dims):
        per = []
        for i, d in enumerate(base_dims):
            parts = {
                k.rsplit("_", 1)[1]: v.to(device) if device is not None else v
                for k, v in enc.items()
                if k.startswith(source_key(b, i, ""))
            }
            per.append(bridges[b][i].decode(parts, dtype=dtype, dim=d))
        sources.append(per)
    return sources
