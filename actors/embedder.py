"""Embedding producers: Ray actors on inference-class nodes that run the frozen base(s).

An `EmbeddingProducer` loads its base(s) once, then turns batches of token rows into
bridge-compressed hidden states, one embedding row per sample (`carryon_ray.embedding.embed_rows`,
the same function the in-process runner calls). It is a callable class so Ray Data can run it as
an elastic actor pool (`map_batches(EmbeddingProducer, compute=ActorPoolStrategy(min_size,
max_size))`) with streaming backpressure into the trainers. It knows nothing about the run that
uses it: bases, bridge calibration and layers come in through its constructor.

`calibrate` is a one-off remote task on the same node class that fits the bridges on a calibration
batch and reports the bases' fingerprints (a `Calibration`).
"""

from __future__ import annotations

import numpy as np

from carryon_ray.base import FrozenBase
from carryon_ray.config import BaseModelConfig, BridgeConfig
from carryon_ray.embedding import ROW_NODES, ROW_SECONDS, Calibration, calibrate as fit, embed_rows, is_code


def _load_bases(base_cfgs: list[dict]) -> list[FrozenBase]:
    return [FrozenBase.load(BaseModelConfig(**c)) for c in base_cfgs]


def calibrate(base_cfgs: list[dict], bridge_cfg: dict, shallow: list[int], rows: list[dict],
              tap_spec: tuple[int, int | None] = (0, None)) -> Calibration:
    """Fit the bridges on token `rows`; the Calibration every other process is built from (which
    state is the deep source: `tap_spec`, see carryon_ray.embedding.calibrate)."""
    return fit(_load_bases(base_cfgs), BridgeConfig(**bridge_cfg), shallow, rows, tuple(tap_spec))


class EmbeddingProducer:
    """Callable for Ray Data: token rows -> embedding rows (carryon_ray.embedding's ROW_* columns).

    With `only=b` the actor loads and runs base b alone: model mixing then chains one actor pool
    per base (each placed and scaled on its own), every pool adding its base's code columns to the
    rows that pass through; the pool marked `last` turns the token rows into embedding rows.
    """

    def __init__(self, base_cfgs: list[dict], calibration: Calibration, only: int | None = None, last: bool = True):
        self.indices = list(range(len(base_cfgs))) if only is None else [only]
        self.bases = _load_bases([base_cfgs[i] for i in self.indices])
        bridges = calibration.bridges()
        self.bridges = [bridges[i] for i in self.indices]
        self.shallow, self.tap, self.last = calibration.shallow, calibration.tap, last
        import ray

        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    def __call__(self, batch: dict) -> dict:
        mine = embed_rows(self.bases, self.bridges, batch, self.shallow, self.indices, self.node, self.tap)
        seconds = mine[ROW_SECONDS] + np.asarray(batch.get(ROW_SECONDS, 0.0))  # time of earlier pools too
        if ROW_NODES in batch:
            mine[ROW_NODES] = np.array([f"{prev},{self.node}" for prev in batch[ROW_NODES]], dtype=object)
        if self.last:  # what the trainers read: embedding rows with the codes of every base
            out = {k: v for k, v in batch.items() if is_code(k)}
            out.update(mine)
        else:  # pass the token rows on to the next base's pool, with this base's codes
            out = dict(batch)
            out.update({k: v for k, v in mine.items() if is_code(k) or k == ROW_NODES})
        out[ROW_SECONDS] = seconds
        return out
