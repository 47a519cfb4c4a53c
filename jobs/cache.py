"""The embedding cache: the base forward runs once per sample; later epochs read the cache.

Trainers stream epoch 0 from the embedding actors and hand each consumed training batch to the
cache. Two backends:

- memory: the cache actor `ray.put`s each batch it receives, so it owns the objects: they live in
  the object store independently of the trainer that produced them and survive a trainer restart
  (Ray 2.56 removed `ray.put(..., _owner=...)`, so ownership has to be taken by the actor itself);
- disk: batches are written as safetensors files under a storage path (shared storage on a real
  cluster), for datasets that do not fit in the object store.

The cache is "complete" once every trainer has finished epoch 0; an incomplete cache (a failure
in the middle of epoch 0) is cleared and the epoch re-streamed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import ray
import torch
from safetensors.torch import load_file, save_file


def put_batch(cache, batch: dict[str, torch.Tensor], mode: str, directory: str | None, rank: int, index: int):
    """Called on a trainer: store one batch in the cache (by reference, never by copy through the actor)."""
    if mode == "memory":
        ray.get(cache.put.remote(batch))
    else:
        path = Path(directory) / f"rank{rank:03d}-{index:06d}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in batch.items()}, str(path))
        ray.get(cache.add.remote([str(path)]))


def get_batch(item) -> dict[str, torch.Tensor]:
    if isinstance(item, str):
        return load_file(item)
    return ray.get(item)


@ray.remote(num_cpus=0)
class EmbeddingCache:
    def __init__(self, mode: str, directory: str | None = None):
        self.mode, self.directory = mode, directory
        self.items: list = []
        self.complete = False

    def add(self, items: list) -> int:
        self.items.extend(items)
        return len(self.items)

    def put(self, batch: dict) -> int:
        self.items.append(ray.put(batch))  # owned by this actor
        return len(self.items)

    def mark_complete(self) -> None:
        self.complete = True

    def status(self) -> dict:
        return {"mode": self.mode, "complete": self.complete, "batches": len(self.items),
                "node": ray.get_runtime_context().get_node_id()}

    def items_for(self, rank: int, world: int) -> list:
        """This rank's share; every rank gets the same count (DDP steps in lockstep)."""
        per = len(self.items) // world
        return self.items[rank::world][:per]

    def clear(self) -> None:
        self.items, self.complete = [], False
        if self.mode == "disk" and self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)
