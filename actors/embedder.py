"""Embedding producers: Ray actors on inference-class nodes that run the frozen base(s).

An `EmbeddingProducer` loads its base(s) once, then turns batches of token rows into
bridge-compressed hidden states, one output row per sample. It is a callable class so Ray Data
can run it as an elastic actor pool (`map_batches(EmbeddingProducer, compute=ActorPoolStrategy(
min_size, max_size))`) with streaming backpressure into the trainers. It knows nothing about the
run that uses it: bases, bridge calibration and layers come in through its constructor.

`calibrate` is a one-off remote task on the same node class that fits the bridges on a calibration
batch and reports the bases' fingerprints.
"""

from __future__ import annotations

import re
import time

import numpy as np
import torch

from carryon_ray.base import FrozenBase
from carryon_ray.bridge import bridges_from_state, bridges_state
from carryon_ray.config import BaseModelConfig, BridgeConfig
from carryon_ray.data import Example, collate
from carryon_ray.embedding import calibrate_bridges, embed_batch, to_rows


def _load_bases(base_cfgs: list[dict]) -> list[FrozenBase]:
    return [FrozenBase.load(BaseModelConfig(**c)) for c in base_cfgs]


def _is_code(column: str) -> bool:
    """Bridge-code columns (s<base>_<source>_<part>), as opposed to ids, labels and stats."""
    return re.match(r"s\d+_\d+_", column) is not None


def _examples(batch: dict) -> list[Example]:
    return [Example(list(map(int, i)), list(map(int, lab))) for i, lab in zip(batch["input_ids"], batch["labels"])]


def calibrate(base_cfgs: list[dict], bridge_cfg: dict, shallow: list[int], rows: dict) -> dict:
    """Fit the bridges on `rows` (input_ids/labels lists); return their tensors and fingerprints."""
    bases = _load_bases(base_cfgs)
    tok = bases[0].tokenizer
    for b in bases[1:]:
        if b.fingerprint().tokenizer_sha != bases[0].fingerprint().tokenizer_sha:
            raise ValueError(f"base {b.name!r} does not share the tokenizer of {bases[0].name!r}; mixed bases must")
    batch = collate(_examples(rows), tok.pad_token_id)
    bridges = calibrate_bridges(bases, BridgeConfig(**bridge_cfg), batch["input_ids"], batch["attention_mask"], shallow)
    return {
        "bridges": {k: v.numpy() for k, v in bridges_state(bridges).items()},
        "fingerprints": [b.fingerprint().to_dict() for b in bases],
        "hidden_sizes": [b.hidden_size for b in bases],
        "vocab_size": bases[0].vocab_size,
        "dtype": str(bases[0].dtype).replace("torch.", ""),
    }


class EmbeddingProducer:
    """Callable for Ray Data: {sample_id, input_ids, labels} rows -> per-sample bridge codes.

    With `only=b` the actor loads and runs base b alone: model mixing then chains one actor pool
    per base (each placed and scaled on its own), every pool adding its base's columns to the rows
    that pass through; the pool marked `last` packs the labels and drops the token ids.
    """

    def __init__(self, base_cfgs: list[dict], bridge_bits: int, bridge_tensors: dict, dims: list[list[int]],
                 shallow: list[int], only: int | None = None, last: bool = True):
        torch.set_num_threads(max(1, torch.get_num_threads()))
        self.indices = list(range(len(base_cfgs))) if only is None else [only]
        self.bases = _load_bases([base_cfgs[i] for i in self.indices])
        tensors = {k: torch.tensor(np.asarray(v)) for k, v in bridge_tensors.items()}
        bridges = bridges_from_state(bridge_bits, dims, tensors)
        self.bridges = [bridges[i] for i in self.indices]
        self.shallow, self.last = shallow, last
        self.pad = self.bases[0].tokenizer.pad_token_id
        import ray

        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    def __call__(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        padded = collate(_examples(batch), self.pad)
        enc = embed_batch(self.bases, self.bridges, padded["input_ids"], padded["attention_mask"], self.shallow)
        # embed_batch numbers its bases from 0; name the columns by the run's base index.
        enc = {f"s{self.indices[int(k[1:k.index('_')])]}{k[k.index('_'):]}": v for k, v in enc.items()}
        rows = to_rows(enc, padded["labels"], padded["attention_mask"], batch["sample_id"])
        elapsed = time.perf_counter() - t0
        mine = {k: np.array(v, dtype=object) if isinstance(v[0], bytes) else np.asarray(v) for k, v in rows.items()}
        # Producer throughput travels with the data: each row carries its share of the seconds
        # this batch took (by token count), so trainers can sum tokens and seconds over any rows.
        lengths = mine["length"].astype(np.float64)
        seconds = elapsed * lengths / max(lengths.sum(), 1.0) + np.asarray(batch.get("embed_seconds", 0.0))
        nodes = [f"{prev},{self.node}" for prev in batch["producer_node"]] if "producer_node" in batch \
            else [self.node] * len(lengths)
        if self.last:  # what the trainers read: codes of every base, packed labels, no token ids
            out = {k: v for k, v in batch.items() if _is_code(k)}
            out.update(mine)
        else:  # pass everything on to the next base's pool, plus this base's codes
            out = dict(batch)
            out.update({k: v for k, v in mine.items() if _is_code(k)})
        out["embed_seconds"] = seconds
        out["producer_node"] = np.array(nodes, dtype=object)  # placement audit
        return out
