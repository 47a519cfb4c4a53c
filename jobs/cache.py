"""The embedding cache: the base forward runs once per sample; later epochs read the cache.

Trainers stream epoch 0 from the embedding actors and hand each consumed training batch (an
`EncodedBatch` as named tensors) to the cache. Two backends:

Either way a batch is one safetensors blob (its named tensors), so the cache actor holds bytes and
never imports torch (a worker process that does pays ~1.5 s of CPU at its start).

- memory: the blob is sent to the cache actor, which `ray.put`s it, so the actor owns the object:
  it lives in the object store independently of the trainer that produced it and survives a
  trainer restart (Ray 2.56 removed `ray.put(..., _owner=...)`, so ownership has to be taken by
  the actor itself; the batch therefore passes through the actor once);
- disk: the trainer writes the batch as a safetensors file under a storage path and sends only its
  location, for datasets that do not fit in the object store. The path is any filesystem pyarrow
  understands: a local directory, or shared storage (s3://, gs://, abfs://, file://) so that
  trainers on several nodes read one cache.

The cache is "complete" once every trainer has finished epoch 0; an incomplete cache (a failure
in the middle of epoch 0) is cleared and the epoch re-streamed. One cache actor per job holds a
set per dataset ("train", "val", "general"), each complete or not on its own and, on disk, under
its own directory (`set_dir`): validation sets stream once per job, and a worker group that
restarts or resizes reads them back instead of asking the producers again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import ray

if TYPE_CHECKING:
    from carryon_ray.embedding import EncodedBatch


def storage(location: str):
    """(pyarrow filesystem, path) of a local path or a URI."""
    import pyarrow.fs as pafs

    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), location


def set_dir(cache_dir: str, name: str) -> str:
    """Where the cache of one dataset ("train", "val", "general") keeps its files in disk mode."""
    return f"{cache_dir.rstrip('/')}/{name}"


def put_batch(cache, batch: EncodedBatch, mode: str, directory: str | None, rank: int, index: int,
              name: str = "train") -> None:
    """Called on a trainer: store one batch in set `name` of the cache (`directory`: the cache's)."""
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in batch.tensors().items()})
    if mode == "memory":
        ray.get(cache.put.remote(blob, name))
    else:
        location = f"{set_dir(directory, name)}/rank{rank:03d}-{index:06d}.safetensors"
        fs, path = storage(location)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as out:
            out.write(blob)
        ray.get(cache.add.remote([location], name))


def get_batch(item) -> EncodedBatch:
    """Called on a trainer: one cached batch, from its file (disk) or its object (memory)."""
    from safetensors.torch import load

    from carryon_ray.embedding import EncodedBatch

    if isinstance(item, str):
        fs, path = storage(item)
        with fs.open_input_file(path) as f:
            blob = f.read()
    else:
        blob = ray.get(item)
    return EncodedBatch.from_tensors(load(blob))


@ray.remote(num_cpus=0)
class EmbeddingCache:
    def __init__(self, mode: str, directory: str | None = None):
        self.mode, self.directory = mode, directory
        self.sets: dict[str, dict] = {}  # name -> {"items": [...], "complete": bool}

    def _set(self, name: str) -> dict:
        return self.sets.setdefault(name, {"items": [], "complete": False})

    def add(self, items: list, name: str = "train") -> int:
        self._set(name)["items"].extend(items)
        return len(self.sets[name]["items"])

    def put(self, blob: bytes, name: str = "train") -> int:
        self._set(name)["items"].append(ray.put(blob))  # owned by this actor
        return len(self.sets[name]["items"])

    def mark_complete(self, name: str = "train") -> None:
        self._set(name)["complete"] = True

    def status(self, name: str = "train") -> dict:
        s = self._set(name)
        return {"mode": self.mode, "complete": s["complete"], "batches": len(s["items"]),
                "node": ray.get_runtime_context().get_node_id()}

    def items_for(self, rank: int, world: int, name: str = "train") -> list:
        """This rank's share; every rank gets the same count (DDP steps in lockstep)."""
        items = self._set(name)["items"]
        per = len(items) // world
        return items[rank::world][:per]

    def clear(self, name: str = "train") -> None:
        self.sets[name] = {"items": [], "complete": False}
        if self.mode == "disk" and self.directory:
            fs, path = storage(set_dir(self.directory, name))
            try:
                fs.delete_dir(path)
            except (FileNotFoundError, OSError):
                pass  # nothing written yet
