"""Inference side of the pipeline: token rows -> base hidden states -> bridge codes, and back.

Everything that crosses a process between the inference side and the training side is defined
here, once:

- `Calibration`: what the one-off calibration returns (bridge tensors, base fingerprints, widths,
  vocabulary, dtype); trainers, the in-process runner and the adapter are built from it.
- token rows (`token_rows`, `training_rows`): {sample_id, replay, input_ids, labels} per sample;
- embedding rows (`embed_rows`, the `ROW_*` columns): per-sample bridge codes as raw bytes, each at
  its own length, plus the sample id, the replay flag and the producer's timing and node;
- `from_rows`: a group of embedding rows re-padded into one `EncodedBatch` for training.

The embedding actors (actors/embedder.py) and the in-process runner (carryon_ray/recipe.py) both
call `embed_rows`, and both runners batch with `from_rows`, so the two paths see the same tensors.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .base import FrozenBase
from .bridge import Bridges, bridges_from_state, bridges_state, fit_bridges
from .config import BridgeConfig
from .loss import IGNORE

# -- the columns of the rows that cross the object store ---------------------------------------
ROW_ID = "sample_id"  # int: position of the sample in the run's training (or validation) rows
ROW_REPLAY = "replay"  # bool: a general-domain replay row (KL to the base) rather than customization data
ROW_INPUT_IDS = "input_ids"  # token ids (token rows only; dropped once the codes exist)
ROW_LABELS = "labels"  # token rows: label ids; embedding rows: int32 bytes at the sample's length
ROW_LENGTH = "length"  # int: tokens in the sample
ROW_SECONDS = "embed_seconds"  # float: this row's share of its batch's producer time (by tokens)
ROW_NODES = "producer_node"  # str: comma-separated node ids of the producers that ran the row
_CODE = re.compile(r"s\d+_\d+_")


def source_key(base: int, source: int, part: str) -> str:
    """Column / tensor name of one bridge part: base b, source i (0 deep, then shallow), part."""
    return f"s{base}_{source}_{part}"


def is_code(column: str) -> bool:
    """Bridge-code columns, as opposed to ids, labels and producer stats."""
    return _CODE.match(column) is not None


def source_dims(hidden_sizes: list[int], shallow: list[int]) -> list[list[int]]:
    """Widths of the carry-on's sources: per base, the deep state then each shallow layer."""
    return [[d] * (1 + len(shallow)) for d in hidden_sizes]


# ---------------------------------------------------------------------------------------------
# Calibration: fitted once on the inference side, shipped to everything else.
# ---------------------------------------------------------------------------------------------


@dataclass
class Calibration:
    """The bridge fitted on a calibration batch, and what the trainers need to know of the bases
    without loading them. Plain numbers, strings and numpy arrays: it pickles across processes."""

    bits: int
    bridge_tensors: dict[str, np.ndarray]
    fingerprints: list[dict]
    hidden_sizes: list[int]
    vocab_size: int
    dtype: str  # the base's dtype name, e.g. "float32"
    shallow: list[int] = field(default_factory=list)

    @property
    def base_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def dims(self) -> list[list[int]]:
        return source_dims(self.hidden_sizes, self.shallow)

    def bridges(self) -> Bridges:
        tensors = {k: torch.tensor(np.asarray(v)) for k, v in self.bridge_tensors.items()}
        return bridges_from_state(self.bits, self.dims, tensors)

    def bytes_per_token(self) -> float:
        """Bridge bytes on the wire per token, all streams together."""
        return sum(br.bytes_per_token(d, self.base_dtype)
                   for brs, ds in zip(self.bridges(), self.dims) for br, d in zip(brs, ds))


def calibrate(bases: list[FrozenBase], cfg: BridgeConfig, shallow: list[int], rows: list[dict]) -> Calibration:
    """Fit the bridges (channel scales, optional PCA) on the real tokens of `rows` (token rows)."""
    for b in bases[1:]:
        if b.fingerprint().tokenizer_sha != bases[0].fingerprint().tokenizer_sha:
            raise ValueError(f"base {b.name!r} does not share the tokenizer of {bases[0].name!r}; mixed bases must")
    batch = collate_rows(rows, bases[0].tokenizer.pad_token_id)
    bridges = calibrate_bridges(bases, cfg, batch["input_ids"], batch["attention_mask"], shallow)
    return Calibration(
        bits=cfg.bits,
        bridge_tensors={k: v.numpy() for k, v in bridges_state(bridges).items()},
        fingerprints=[b.fingerprint().to_dict() for b in bases],
        hidden_sizes=[b.hidden_size for b in bases],
        vocab_size=bases[0].vocab_size,
        dtype=str(bases[0].dtype).replace("torch.", ""),
        shallow=list(shallow),
    )


def calibrate_bridges(
    bases: list[FrozenBase], cfg: BridgeConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    shallow: list[int],
) -> Bridges:
    """Fit the bridges on the real tokens of one padded batch."""
    keep = attention_mask.bool()
    calib = []
    for base in bases:
        states, _ = base.hidden_states(input_ids, attention_mask, shallow)
        calib.append([s[keep.to(s.device)][: cfg.calibration_tokens].float().cpu() for s in states])
    return fit_bridges(cfg, calib)


def calibration_rows(cfg) -> int:
    """Rows in the calibration batch: enough for bridge.calibration_tokens at typical lengths."""
    return max(8, min(64, cfg.bridge.calibration_tokens // 64))


# ---------------------------------------------------------------------------------------------
# Token rows.
# ---------------------------------------------------------------------------------------------


def token_rows(examples, replay: bool = False, first_id: int = 0) -> list[dict]:
    """One token row per example (see the ROW_* columns)."""
    return [{ROW_ID: first_id + i, ROW_REPLAY: replay, ROW_INPUT_IDS: list(e.input_ids), ROW_LABELS: list(e.labels)}
            for i, e in enumerate(examples)]


def training_rows(splits, seed: int) -> list[dict]:
    """The run's training rows in training order: the customization rows, then (with replay) the
    general-domain rows flagged `replay`, shuffled together so every batch may hold some.
    Both runners train on exactly this list; the calibration batch is its head."""
    rows = token_rows(splits.train)
    if splits.replay:
        rows += token_rows(splits.replay, replay=True, first_id=len(rows))
        random.Random(seed).shuffle(rows)
    return rows


def collate_rows(rows, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token rows (dicts, or a Ray Data batch of columns) into input_ids / attention_mask /
    labels tensors."""
    if isinstance(rows, dict):  # a columnar batch
        ids_col, lab_col = rows[ROW_INPUT_IDS], rows[ROW_LABELS]
    else:
        ids_col, lab_col = [r[ROW_INPUT_IDS] for r in rows], [r[ROW_LABELS] for r in rows]
    T = max(len(i) for i in ids_col)
    ids = torch.full((len(ids_col), T), pad_id, dtype=torch.long)
    labels = torch.full((len(ids_col), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(ids_col), T), dtype=torch.long)
    for j, (i, lab) in enumerate(zip(ids_col, lab_col)):
        n = len(i)
        ids[j, :n] = torch.as_tensor(np.asarray(i, dtype=np.int64))
        labels[j, :n] = torch.as_tensor(np.asarray(lab, dtype=np.int64))
        mask[j, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------------------------------------
# Embedding: one padded batch through the base(s) and the bridges.
# ---------------------------------------------------------------------------------------------


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


def embed_rows(bases: list[FrozenBase], bridges: Bridges, batch: dict, shallow: list[int],
               base_ids: list[int] | None = None, node: str = "") -> dict[str, np.ndarray]:
    """What an embedding producer does to a batch of token rows: collate, run the base(s), encode,
    split per sample. Returns embedding-row columns (codes named by the run's base index
    `base_ids[b]`, labels as bytes, id, replay flag, length, timing, node)."""
    t0 = time.perf_counter()
    base_ids = base_ids or list(range(len(bases)))
    padded = collate_rows(batch, bases[0].tokenizer.pad_token_id)
    enc = embed_batch(bases, bridges, padded["input_ids"], padded["attention_mask"], shallow)
    # embed_batch numbers its bases from 0; name the columns by the run's base index.
    enc = {f"s{base_ids[int(k[1:k.index('_')])]}{k[k.index('_'):]}": v for k, v in enc.items()}
    lengths = padded["attention_mask"].sum(-1).tolist()
    out: dict[str, np.ndarray] = {
        ROW_ID: np.asarray(batch[ROW_ID], dtype=np.int64),
        ROW_REPLAY: np.asarray(batch[ROW_REPLAY], dtype=bool),
        ROW_LENGTH: np.asarray(lengths, dtype=np.int64),
        ROW_LABELS: _object([_to_bytes(padded["labels"][j, :n].to(torch.int32)) for j, n in enumerate(lengths)]),
    }
    for k, t in enc.items():
        out[k] = _object([_to_bytes(t[j, :n]) for j, n in enumerate(lengths)])
    # Producer throughput travels with the data: each row carries its share of the seconds this
    # batch took (by token count), so trainers can sum tokens and seconds over any rows.
    share = np.asarray(lengths, dtype=np.float64) / max(sum(lengths), 1)
    out[ROW_SECONDS] = (time.perf_counter() - t0) * share
    out[ROW_NODES] = _object([node] * len(lengths))
    return out


def _object(values: list) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


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


# ---------------------------------------------------------------------------------------------
# The training side: rows back into padded batches, codes back into states.
# ---------------------------------------------------------------------------------------------


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


@dataclass
class EncodedBatch:
    """A training batch as it leaves the object store: bridge codes re-padded to the longest
    sample (right padding), labels, the real-token mask, and per-sample bookkeeping. Tensors only
    in `enc`, so a batch can be cached in the object store or as safetensors."""

    enc: dict[str, torch.Tensor]  # bridge parts [B, T, ...]
    labels: torch.Tensor  # [B, T], IGNORE on padding and unscored tokens
    attention_mask: torch.Tensor  # [B, T], 1 = real token
    sample_ids: list[int]
    replay: torch.Tensor  # [B] bool
    produced_tokens: int = 0  # tokens embedded for this batch, and the producer seconds they took
    produced_seconds: float = 0.0
    producer_nodes: set[str] = field(default_factory=set)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything a later epoch needs, as named tensors (for the embedding cache)."""
        return {**self.enc, "labels": self.labels, "attention_mask": self.attention_mask,
                "sample_id": torch.tensor(self.sample_ids, dtype=torch.long), "replay": self.replay}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "EncodedBatch":
        enc = {k: v for k, v in t.items() if is_code(k)}
        return cls(enc, t["labels"], t["attention_mask"], t["sample_id"].tolist(), t["replay"].bool())


def from_rows(rows: dict, layout: dict[str, tuple[torch.dtype, int]]) -> EncodedBatch:
    """Re-pad a group of embedding rows (columns) into one EncodedBatch."""
    lengths = [int(n) for n in rows[ROW_LENGTH]]
    B, T = len(lengths), max(lengths)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    enc = {k: torch.zeros((B, T, last), dtype=dt) for k, (dt, last) in layout.items()}
    for j, n in enumerate(lengths):
        labels[j, :n] = _from_bytes(rows[ROW_LABELS][j], torch.int32, 1)[:, 0].long()
        for k, (dt, last) in layout.items():
            enc[k][j, :n] = _from_bytes(rows[k][j], dt, last)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    nodes = {n for chain in rows.get(ROW_NODES, []) for n in str(chain).split(",") if n}
    return EncodedBatch(enc, labels, mask, [int(s) for s in rows[ROW_ID]],
                        torch.as_tensor(np.asarray(rows[ROW_REPLAY], dtype=bool)),
                        sum(lengths), float(np.sum(rows.get(ROW_SECONDS, 0.0))), nodes)


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


def row_batches(rows: dict, batch_size: int):
    """Consecutive groups of `batch_size` embedding rows (columns sliced), in order."""
    n = len(rows[ROW_ID])
    for i in range(0, n, batch_size):
        yield {k: v[i : i + batch_size] for k, v in rows.items()}


def concat_rows(parts: list[dict]) -> dict:
    """Concatenate embedding-row column dicts (the producer's outputs) in order."""
    keys = parts[0].keys()
    return {k: np.concatenate([p[k] for p in parts]) for k in keys}
