"""Inference side of the pipeline: token rows -> base hidden states -> bridge codes, and back.

Everything that crosses a process between the inference side and the training side is defined
here, once:

- `Calibration`: what the one-off calibration returns (bridge tensors, base fingerprints, widths,
  vocabulary, dtype); trainers, the in-process runner and the adapter are built from it.
- token rows (`token_rows`, `training_rows`): {sample_id, replay, input_ids, labels} per sample;
- embedding rows (`embed_rows`, the `ROW_*` columns): per-sample bridge codes as raw bytes, each at
  its own length, plus the sample id, the replay flag and the producer's timing and node;
- `from_rows`: a group of embedding rows re-padded into one `EncodedBatch` for training.

The embedding actors (actors/embedder.py) and the in-process backend (carryon_ray/pipeline.py) both
call `embed_rows`, and both runners batch with `from_rows`, so the two paths see the same tensors.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import NamedTuple
from dataclasses import dataclass, field

import numpy as np
import torch

from .base import FrozenBase
from .bridge import Bridges, bridges_from_state, bridges_state, fit_bridges
from .config import BridgeConfig, resolve_tap
from .data import Example, RowPlan, sample_id
from .rows import (IGNORE, ROW_ID, ROW_INPUT_IDS, ROW_LABELS, ROW_LENGTH, ROW_NODES, ROW_REPLAY,  # noqa: F401
                   ROW_SECONDS, ROW_SEGMENTS, concat_rows)

# -- the columns of the rows that cross the object store (names in rows.py) -----------------------
_CODE = re.compile(r"s(\d+)_(\d+)_(\w+)$")


class SourceKey(NamedTuple):
    """The name of one bridge part's column (and tensor): base b, source i (0 the deep state, then
    each shallow layer), part (values; or codes, lo, scale). Written as `s{b}_{i}_{part}`; `parse`
    is the only reader of that spelling."""

    base: int
    source: int
    part: str

    def __str__(self) -> str:
        return f"s{self.base}_{self.source}_{self.part}"

    @classmethod
    def parse(cls, name: str) -> "SourceKey | None":
        """The key a column name spells, or None for ids, labels and producer stats."""
        m = _CODE.match(name)
        return cls(int(m[1]), int(m[2]), m[3]) if m else None


def source_key(base: int, source: int, part: str) -> str:
    """Column / tensor name of one bridge part (`SourceKey`)."""
    return str(SourceKey(base, source, part))


def is_code(column: str) -> bool:
    """Bridge-code columns, as opposed to ids, labels and producer stats."""
    return SourceKey.parse(column) is not None


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
    source_map: list[int] | None = None  # a subset: which embedded sources it keeps (see `subset`)
    tap: int | None = None  # the deep source: None = the final state; j = the state entering block j

    @property
    def base_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def dims(self) -> list[list[int]]:
        return source_dims(self.hidden_sizes, self.shallow)

    def bridges(self) -> Bridges:
        tensors = {k: torch.tensor(np.asarray(v)) for k, v in self.bridge_tensors.items()}
        return bridges_from_state(self.bits, self.dims, tensors)

    def subset(self, shallow: list[int]) -> "Calibration":
        """This calibration for fewer shallow layers (a tune trial choosing among the embedded ones);
        `select` then maps batches embedded with all of them."""
        missing = [k for k in shallow if k not in self.shallow]
        if missing:
            raise ValueError(f"shallow layers {missing} were not embedded (embedded: {self.shallow})")
        keep = [0] + [1 + self.shallow.index(k) for k in shallow]  # source indices: deep, then shallow
        tensors = {}
        for name, t in self.bridge_tensors.items():
            _, b, i, rest = name.split(".", 3)
            if int(i) in keep:
                tensors[f"bridge.{b}.{keep.index(int(i))}.{rest}"] = t
        return Calibration(self.bits, tensors, self.fingerprints, self.hidden_sizes, self.vocab_size, self.dtype,
                           list(shallow), keep, self.tap)

    def select(self, batch: "EncodedBatch") -> "EncodedBatch":
        """A batch embedded with every layer of the full calibration, keeping this subset's sources."""
        keep = self.source_map
        if keep is None:
            return batch
        enc = {}
        for name, t in batch.enc.items():
            key = SourceKey.parse(name)
            if key.source in keep:
                enc[str(key._replace(source=keep.index(key.source)))] = t
        return dataclasses.replace(batch, enc=enc)

    def bytes_per_token(self) -> float:
        """Bridge bytes on the wire per token, all streams together."""
        return sum(br.bytes_per_token(d, self.base_dtype)
                   for brs, ds in zip(self.bridges(), self.dims) for br, d in zip(brs, ds))


def calibrate(bases: list[FrozenBase], cfg: BridgeConfig, shallow: list[int], rows: list[dict],
              tap_spec: tuple[int, int | None] = (0, None)) -> Calibration:
    """Fit the bridges (channel scales, optional PCA) on the real tokens of `rows` (token rows).
    `tap_spec` is the config's (depth, tap) (CarryOnConfig.tap_spec): which state is the deep source,
    checked here against the base's block count."""
    for b in bases[1:]:
        if b.fingerprint().tokenizer_sha != bases[0].fingerprint().tokenizer_sha:
            raise ValueError(f"base {b.name!r} does not share the tokenizer of {bases[0].name!r}; mixed bases must")
    tap = resolve_tap(*tap_spec, bases[0].num_layers)
    batch = collate_rows(rows, bases[0].tokenizer.pad_token_id)
    bridges = calibrate_bridges(bases, cfg, batch["input_ids"], batch["attention_mask"], shallow, tap)
    return Calibration(
        bits=cfg.bits,
        bridge_tensors={k: v.numpy() for k, v in bridges_state(bridges).items()},
        fingerprints=[b.fingerprint().to_dict() for b in bases],
        hidden_sizes=[b.hidden_size for b in bases],
        vocab_size=bases[0].vocab_size,
        dtype=str(bases[0].dtype).replace("torch.", ""),
        shallow=list(shallow),
        tap=tap,
    )


def calibrate_bridges(
    bases: list[FrozenBase], cfg: BridgeConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    shallow: list[int],
    tap: int | None = None,
) -> Bridges:
    """Fit the bridges on the real tokens of one padded batch."""
    keep = attention_mask.bool()
    calib = []
    for base in bases:
        states, _ = base.hidden_states(input_ids, attention_mask, shallow, tap=tap)
        calib.append([s[keep.to(s.device)][: cfg.calibration_tokens].float().cpu() for s in states])
    return fit_bridges(cfg, calib)


def calibration_rows(cfg) -> int:
    """Rows in the calibration batch: enough for bridge.calibration_tokens at typical lengths."""
    return max(8, min(64, cfg.bridge.calibration_tokens // 64))


# ---------------------------------------------------------------------------------------------
# Token rows.
# ---------------------------------------------------------------------------------------------


def token_rows(examples, replay: bool = False) -> list[dict]:
    """One token row per example (see the ROW_* columns); ids come from the examples' keys."""
    return [{ROW_ID: sample_id(e.key), ROW_REPLAY: replay, ROW_INPUT_IDS: list(e.input_ids), ROW_LABELS: list(e.labels),
             ROW_SEGMENTS: list(e.segments or [])} for e in examples]


def training_examples(splits, cfg) -> list[tuple[Example, bool]]:
    """The run's training examples in training order, each with its replay flag: customization and
    replay rows merged by their order keys (RowPlan.order), packed by RowPlan.packed when
    data.pack_examples says so. Both backends train on exactly this sequence."""
    plan = RowPlan(cfg.data, cfg.train.seed)
    tagged = [(e, False) for e in splits.train] + [(e, True) for e in splits.replay or []]
    tagged.sort(key=lambda p: plan.order(p[0].key))
    return list(plan.packed(tagged))


def training_rows(splits, cfg) -> list[dict]:
    """Token rows of `training_examples` (the calibration batch is their head)."""
    return [row for e, replay in training_examples(splits, cfg) for row in token_rows([e], replay)]


def collate_rows(rows, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token rows (dicts, or a Ray Data batch of columns) into input_ids / attention_mask /
    labels tensors; packed rows also get `position_ids` (restarting at each example) and a 4D
    `attn_mask` (attention inside each example only)."""
    if isinstance(rows, dict):  # a columnar batch
        ids_col, lab_col = rows[ROW_INPUT_IDS], rows[ROW_LABELS]
        seg_col = rows.get(ROW_SEGMENTS, [()] * len(ids_col))
    else:
        ids_col, lab_col = [r[ROW_INPUT_IDS] for r in rows], [r[ROW_LABELS] for r in rows]
        seg_col = [r.get(ROW_SEGMENTS, ()) for r in rows]
    T = max(len(i) for i in ids_col)
    ids = torch.full((len(ids_col), T), pad_id, dtype=torch.long)
    labels = torch.full((len(ids_col), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(ids_col), T), dtype=torch.long)
    for j, (i, lab) in enumerate(zip(ids_col, lab_col)):
        n = len(i)
        # Ray Data hands out read-only arrays: copy into the batch (torch.as_tensor would share the
        # read-only buffer and warn once per actor)
        ids[j, :n] = torch.from_numpy(np.array(i, dtype=np.int64))
        labels[j, :n] = torch.from_numpy(np.array(lab, dtype=np.int64))
        mask[j, :n] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(len(s) > 1 for s in seg_col):
        out.update(packed_layout([list(map(int, s)) or [len(i)] for s, i in zip(seg_col, ids_col)], T))
    return out


def packed_layout(segments: list[list[int]], T: int) -> dict[str, torch.Tensor]:
    """position_ids [B, T] restarting at every example and a 4D bool attn_mask [B, 1, T, T] letting
    each token see only earlier tokens of its own example (padding sees itself only)."""
    seg_id = torch.full((len(segments), T), -1, dtype=torch.long)
    pos = torch.zeros((len(segments), T), dtype=torch.long)
    for j, segs in enumerate(segments):
        at = 0
        for k, n in enumerate(segs):
            seg_id[j, at : at + n] = k
            pos[j, at : at + n] = torch.arange(n)
            at += n
    same = seg_id[:, :, None] == seg_id[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    real = seg_id >= 0
    attn = (same & causal & real[:, None, :]) | torch.eye(T, dtype=torch.bool)  # padding attends to itself
    return {"position_ids": pos, "attn_mask": attn[:, None]}


# ---------------------------------------------------------------------------------------------
# Embedding: one padded batch through the base(s) and the bridges.
# ---------------------------------------------------------------------------------------------


def embed_batch(
    bases: list[FrozenBase], bridges: Bridges, input_ids: torch.Tensor, attention_mask: torch.Tensor, shallow: list[int],
    position_ids: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None, tap: int | None = None,
) -> dict[str, torch.Tensor]:
    """Run every base on one padded token batch; return bridge-encoded sources (on CPU). Packed
    batches pass their `position_ids` and 4D `attn_mask` (see `packed_layout`); `tap` makes the
    deep source the state entering that block (Calibration.tap)."""
    states = base_states(bases, input_ids, attention_mask, shallow, position_ids, attn_mask, tap)
    return encode_states(bridges, states)


def base_states(bases: list[FrozenBase], input_ids: torch.Tensor, attention_mask: torch.Tensor, shallow: list[int],
                position_ids: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                tap: int | None = None) -> list[list[torch.Tensor]]:
    """[base][source] hidden states of one padded batch: the forward half of `embed_batch`."""
    out = []
    for base in bases:
        mask = attention_mask if attn_mask is None else base.prepare_mask(attn_mask.to(base.device))
        states, _ = base.hidden_states(input_ids, mask, shallow, position_ids=position_ids, tap=tap)
        out.append(states)
    return out


def encode_states(bridges: Bridges, states: list[list[torch.Tensor]], rows: slice = slice(None)) -> dict[str, torch.Tensor]:
    """The bridge codes of `states`' rows `rows` (every bridge encodes each token on its own, so a
    slice of a shared batch encodes as that slice alone would)."""
    out: dict[str, torch.Tensor] = {}
    for b, per_base in enumerate(states):
        for i, s in enumerate(per_base):
            for part, t in bridges[b][i].encode(s[rows]).items():
                out[source_key(b, i, part)] = t.cpu()
    return out


def embed_rows(bases: list[FrozenBase], bridges: Bridges, batch: dict, shallow: list[int],
               base_ids: list[int] | None = None, node: str = "", tap: int | None = None) -> dict[str, np.ndarray]:
    """What an embedding producer does to a batch of token rows: collate, run the base(s), encode,
    split per sample. Returns embedding-row columns (codes named by the run's base index
    `base_ids[b]`, labels as bytes, id, replay flag, length, timing, node)."""
    return embed_many(bases, [(bridges, batch)], shallow, base_ids, node, tap)[0]


def embed_many(bases: list[FrozenBase], jobs: list[tuple[Bridges, dict]], shallow: list[int],
               base_ids: list[int] | None = None, node: str = "", tap: int | None = None) -> list[dict[str, np.ndarray]]:
    """`embed_rows` for several jobs' batches in one forward: their token rows are padded into one
    batch and run through the base(s) once; each job's rows are then encoded with that job's own
    bridges. The jobs must share the forward's shape (`shallow` layers, `tap`, bases); each gets
    its embedding-row columns back, as `embed_rows` would return them for its batch alone."""
    t0 = time.perf_counter()
    base_ids = base_ids or list(range(len(bases)))
    merged = {k: [x for _, batch in jobs for x in batch[k]] for k in (ROW_INPUT_IDS, ROW_LABELS)}
    if any(ROW_SEGMENTS in batch for _, batch in jobs):
        merged[ROW_SEGMENTS] = [x for _, b in jobs for x in b.get(ROW_SEGMENTS, [()] * len(b[ROW_INPUT_IDS]))]
    padded = collate_rows(merged, bases[0].tokenizer.pad_token_id)
    states = base_states(bases, padded["input_ids"], padded["attention_mask"], shallow, padded.get("position_ids"),
                         padded.get("attn_mask"), tap)
    lengths_all = padded["attention_mask"].sum(-1).tolist()
    seconds = time.perf_counter() - t0
    total = max(sum(lengths_all), 1)
    outs, at = [], 0
    for bridges, batch in jobs:
        n_rows = len(batch[ROW_INPUT_IDS])
        rows = slice(at, at + n_rows)
        t1 = time.perf_counter()
        enc = encode_states(bridges, states, rows)
        # encode numbers its bases from 0; name the columns by the run's base index.
        enc = {str(key._replace(base=base_ids[key.base])): v for key, v in ((SourceKey.parse(k), v) for k, v in enc.items())}
        lengths = lengths_all[rows]
        labels = padded["labels"][rows]
        out: dict[str, np.ndarray] = {
            ROW_ID: np.asarray(batch[ROW_ID], dtype=np.int64),
            ROW_REPLAY: np.asarray(batch[ROW_REPLAY], dtype=bool),
            ROW_LENGTH: np.asarray(lengths, dtype=np.int64),
            ROW_LABELS: _object([_to_bytes(labels[j, :n].to(torch.int32)) for j, n in enumerate(lengths)]),
            ROW_SEGMENTS: _object([_to_bytes(torch.tensor(list(map(int, s)), dtype=torch.int32))
                                   for s in batch.get(ROW_SEGMENTS, [()] * len(lengths))]),
        }
        for k, t in enc.items():
            out[k] = _object([_to_bytes(t[j, :n]) for j, n in enumerate(lengths)])
        # Producer throughput travels with the data: each row carries its share of the seconds its
        # forward took (by token count, over every job's rows in it) plus its job's encoding, so
        # trainers can sum tokens and seconds over any rows.
        share = np.asarray(lengths, dtype=np.float64)
        out[ROW_SECONDS] = seconds * share / total + (time.perf_counter() - t1) * share / max(share.sum(), 1)
        out[ROW_NODES] = _object([node] * len(lengths))
        outs.append(out)
        at += n_rows
    return outs


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
    segments: list[list[int]] | None = None  # packed batches: each row's example lengths

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything a later epoch needs, as named tensors (for the embedding cache)."""
        out = {**self.enc, "labels": self.labels, "attention_mask": self.attention_mask,
               "sample_id": torch.tensor(self.sample_ids, dtype=torch.long), "replay": self.replay}
        if self.segments is not None:  # flattened with row offsets (safetensors holds tensors only)
            out["segments"] = torch.tensor([n for s in self.segments for n in s], dtype=torch.long)
            out["segment_rows"] = torch.tensor([len(s) for s in self.segments], dtype=torch.long)
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "EncodedBatch":
        enc = {k: v for k, v in t.items() if is_code(k)}
        segments = None
        if "segments" in t:
            flat, counts = t["segments"].tolist(), t["segment_rows"].tolist()
            offsets = np.cumsum([0] + counts)
            segments = [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        return cls(enc, t["labels"], t["attention_mask"], t["sample_id"].tolist(), t["replay"].bool(),
                   segments=segments)

    def layout(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(position_ids, 4D attention mask) of a packed batch; (None, None) otherwise."""
        if self.segments is None:
            return None, None
        lay = packed_layout(self.segments, self.labels.shape[1])
        return lay["position_ids"], lay["attn_mask"]


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
    segs = [_from_bytes(b, torch.int32, 1)[:, 0].tolist() for b in rows.get(ROW_SEGMENTS, [b""] * B)]
    segments = [s or [n] for s, n in zip(segs, lengths)] if any(len(s) > 1 for s in segs) else None
    return EncodedBatch(enc, labels, mask, [int(s) for s in rows[ROW_ID]],
                        torch.from_numpy(np.array(rows[ROW_REPLAY], dtype=bool)),
                        sum(lengths), float(np.sum(rows.get(ROW_SECONDS, 0.0))), nodes, segments)


def decode_sources(
    bridges: Bridges, enc: dict[str, torch.Tensor], dims: list[list[int]], dtype=torch.float32, device=None
) -> list[list[torch.Tensor]]:
    """Inverse of `embed_batch`: list over bases of [deep, shallow...] float tensors."""
    sources = []
    for b, base_dims in enumerate(dims):
        per = []
        for i, d in enumerate(base_dims):
            parts = {
                key.part: v.to(device) if device is not None else v
                for key, v in ((SourceKey.parse(k), v) for k, v in enc.items())
                if key[:2] == (b, i)
            }
            per.append(bridges[b][i].decode(parts, dtype=dtype, dim=d))
        sources.append(per)
    return sources


def row_batches(rows: dict, batch_size: int):
    """Consecutive groups of `batch_size` embedding rows (columns sliced), in order."""
    n = len(rows[ROW_ID])
    for i in range(0, n, batch_size):
        yield {k: v[i : i + batch_size] for k, v in rows.items()}


def columns(rows: list[dict]) -> dict:
    """Token rows (a list of dicts) as one batch of columns, the form `embed_rows` takes."""
    return {k: [r[k] for r in rows] for k in rows[0]}


