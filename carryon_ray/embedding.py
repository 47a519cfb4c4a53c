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


# ---------------------------------------------------------------------------------------------
# Per-sample rows: what travels through Ray's object store between embedding actors and trainers.
# Each sample keeps its own length; tensors travel as raw bytes (no pickled objects), and the
# trainer re-pads whatever samples arrive together into one training batch.
# ---------------------------------------------------------------------------------------------

def _to_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bf16: ship the raw 16-bit patterns
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _from_bytes(buf: bytes, dtype: torch.dtype, last: int) -> torch.Tensor:
    if not buf:
        return torch.empty((0, last), dtype=dtype)
    if dtype == torch.bfloat16:
        return torch.frombuffer(bytearray(buf), dtype=torch.int16).view(torch.bfloat16).reshape(-1, last)
    return torch.frombuffer(bytearray(buf), dtype=dtype).reshape(-1, last)


def part_layout(bridges: Bridges, dims: list[list[int]], base_dtype: torch.dtype) -> dict[str, tuple[torch.dtype, int]]:
    """dtype and last dimension of every encoded part, per stream."""
    layout = {}
    for b, base_dims in enumerate(dims):
        for i, d in enumerate(base_dims):
            br = bridges[b][i]
            p = br.dims(d)
            if br.bits == 0:
                layout[source_key(b, i, "values")] = (base_dtype if br.projection is None else torch.float32, p)
            else:
                layout[source_key(b, i, "codes")] = (torch.uint8, -(-p * br.bits // 8))
                layout[source_key(b, i, "lo")] = (torch.float16, 1)
                layout[source_key(b, i, "scale")] = (torch.float16, 1)
    return layout


def to_rows(enc: dict[str, torch.Tensor], labels: torch.Tensor, attention_mask: torch.Tensor,
            sample_ids) -> dict[str, list]:
    """Split an encoded padded batch into per-sample rows (right padding is dropped)."""
    lengths = attention_mask.sum(-1).tolist()
    rows: dict[str, list] = {"sample_id": [int(s) for s in sample_ids], "length": [int(n) for n in lengths]}
    rows["labels"] = [_to_bytes(labels[j, :n].to(torch.int32)) for j, n in enumerate(lengths)]
    for k, t in enc.items():
        rows[k] = [_to_bytes(t[j, :n]) for j, n in enumerate(lengths)]
    return rows


def from_rows(rows: dict, layout: dict[str, tuple[torch.dtype, int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Re-pad a group of per-sample rows into (encoded batch, labels [B, T]).

    The encoded batch also carries `attention_mask` [B, T] (1 = real token) so the trainer can keep
    the right padding out of routing statistics; `decode_sources` reads only the bridge parts."""
    from .loss import IGNORE

    lengths = [int(n) for n in rows["length"]]
    B, T = len(lengths), max(lengths)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    enc = {k: torch.zeros((B, T, last), dtype=dt) for k, (dt, last) in layout.items()}
    enc["attention_mask"] = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    for j, n in enumerate(lengths):
        labels[j, :n] = _from_bytes(rows["labels"][j], torch.int32, 1)[:, 0].long()
        for k, (dt, last) in layout.items():
            enc[k][j, :n] = _from_bytes(rows[k][j], dt, last)
    return enc, labels
