"""A training worker: `Trainer.fit` (carryon_ray/recipe.py) fed from the cluster.

`run_worker` is the worker, whoever hosts it: `train_loop` runs it under Ray Train's
`TorchTrainer` on training-class nodes, and the cluster's trainer service (jobs/trainers.py) runs
it as a thread per job. `Worker` is what differs between the two (rank, shards, DDP, checkpoints).

It never loads the base: only its output head (for an inherited head) is read from the checkpoint
files. What it adds to the recipe is what a
cluster needs:

  - batches: epoch 0 (or a re-stream after a restart that lost the cache) from the streaming
    dataset shard the embedding actors feed; later epochs from the embedding cache, in the
    recipe's epoch order; validation sets stream once per job into the cache (a set each), so a worker
    group that restarts or grows reads them instead of asking the producers again;
  - DDP across workers (the recipe wraps the carry-on), barriers around the shared cache;
  - a checkpoint per epoch holding the recipe's state (model, optimizer, schedule, alpha search,
    history), so a restarted worker resumes, and the job reads the run's results from it;
  - an audit file per epoch and rank: which samples it trained on, where (node, process), and when.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ray
import ray.train
import torch

from carryon_ray.base import load_head
from carryon_ray.config import CarryOnConfig
from carryon_ray.embedding import Calibration, EncodedBatch, from_rows
from carryon_ray.recipe import EpochInput, NullReporter, RunPlan, Trainer, epoch_order
from carryon_mlflow.tracking import MlflowReporter

from .cache import get_batch, put_batch

log = logging.getLogger("carryon.train")

@dataclass
class TrainLoopConfig:
    """Everything a Train worker is handed by the job (one typed object, not a free dict)."""

    cfg: dict  # the CarryOnConfig, as JSON-able data
    calibration: Calibration
    plan: RunPlan
    cache: object  # the job's EmbeddingCache actor: a set per dataset ("train", "val", "general")
    cache_mode: str  # "memory" or "disk"
    cache_dir: str  # each set's files under set_dir(cache_dir, name) in disk mode
    out_dir: str | None  # where each epoch's audit file goes (None: none is written)
    eval_sets: list[str]  # dataset names besides "train": "val", and "general" when configured
    mlflow_uri: str | None = None
    run_id: str | None = None


def load_state(checkpoint) -> dict:
    """The recipe state saved in a checkpoint (tensors and plain data only: weights_only). Ray
    Train's and Ray Tune's checkpoints are the same class: the job, a resumed worker and the search
    all read with this."""
    with checkpoint.as_directory() as d:
        return Trainer.read_state(d)


def report_state(lib, trainer: Trainer | None, metrics: dict) -> None:
    """`lib.report(metrics, checkpoint=...)` (lib: ray.train or ray.tune, each with its own
    Checkpoint class) with the recipe's state as the checkpoint; `trainer` None: a rank that
    reports metrics only."""
    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if trainer is not None:
            trainer.save_state(d)
            ckpt = lib.Checkpoint.from_directory(d)
        lib.report(metrics, checkpoint=ckpt)


def _stream(shard, layout, batch_size: int):
    """EncodedBatches from a streaming dataset shard, in the order the rows arrive."""
    for rows in shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2):
        yield from_rows(rows, layout)


def quiet_ray_train_reports() -> None:
    """Ray Train's workers log every `report` at INFO ("Reporting training result N: TrainingReport(...)")
    on a logger named by its source file's path, outside the `ray.train` tree its LoggingConfig sets;
    the epoch lines already say what each report holds, so that logger goes to WARNING here."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray Train layout: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


@dataclass
class Worker:
    """Where one worker of a fit runs: what differs between a Ray Train worker (`train_loop`) and a
    fit on the cluster's trainer service (jobs/trainers.py). The epoch loop (`run_worker`) is the
    same for both."""

    rank: int
    world: int
    shard: Callable[[str], object]  # dataset name -> an iterator of this worker's rows (Ray Data)
    wrap: Callable  # the carry-on as this world trains it (DDP when world > 1)
    resume: dict | None  # the recipe state to resume from (the last checkpoint's), or None
    checkpoint: Callable[[Trainer | None, dict], None]  # after each epoch: (the trainer on rank 0, metrics)
    barrier: Callable[[], None] = lambda: None  # all ranks meet (world > 1)
    stopped: Callable[[], bool] = lambda: False  # the fit was cancelled: stop at the next batch
    reporter: object | None = None  # rank 0's Reporter (None: the loop's MLflow run)


class FitStopped(RuntimeError):
    """The fit was cancelled (its job went away); raised at a batch boundary."""


def train_loop(config: dict) -> None:
    """The Ray Train worker: `run_worker` with Ray Train's rank, shards, DDP and checkpoints."""
    loop: TrainLoopConfig = config["loop"]
    cfg = CarryOnConfig.model_validate(loop.cfg)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not log.handlers:  # Ray configures the root logger; give ours its own handler and prefix
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(f"[trainer {rank}] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    quiet_ray_train_reports()

    def wrap(m):
        if world == 1:
            return m
        # Routed experts that saw no token in a step have no gradient: DDP must be told.
        return ray.train.torch.prepare_model(m, move_to_device=False, parallel_strategy_kwargs={
            "broadcast_buffers": False, "find_unused_parameters": cfg.carryon.experts > 0})

    ckpt = ray.train.get_checkpoint()
    run_worker(loop, Worker(
        rank, world, ray.train.get_dataset_shard, wrap, load_state(ckpt) if ckpt else None,
        # rank 0 reports the recipe's state; the others report metrics only
        lambda trainer, metrics: report_state(ray.train, trainer if rank == 0 else None, metrics),
        barrier=torch.distributed.barrier if world > 1 else (lambda: None)))


def run_worker(loop: TrainLoopConfig, w: Worker) -> dict:
    """`Trainer.fit` fed from the cluster: the epochs, the cache, the audit files; returns the
    run's summary."""
    cfg = CarryOnConfig.model_validate(loop.cfg)
    rank, world, wrap = w.rank, w.world, w.wrap

    # -- setup: the recipe, resumed from the last checkpoint when there is one -------------------
    head_w, head_b = load_head(cfg.base) if cfg.head.kind == "inherited" else (None, None)
    reporter = (w.reporter or MlflowReporter(loop.mlflow_uri, loop.run_id)) if rank == 0 else NullReporter()
    trainer = Trainer(cfg, loop.calibration, loop.plan, head_w, head_b, reporter, wrap)
    if w.resume is not None:
        trainer.load_state_dict(w.resume)
        log.info("resumed from checkpoint after epoch %d (step %d, alpha %.4g)", trainer.epoch - 1, trainer.step,
                 trainer.search.current)
    out_dir = Path(loop.out_dir) if loop.out_dir else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    bs = cfg.train.batch_size
    cache = loop.cache
    eval_sets: dict[str, list] = {}

    def eval_batches(name: str):
        """A validation set streams from the producers once per job (every rank reads all of it;
        rank 0 keeps it in its cache); a later worker life, after a restart or a resize, reads the
        cache. A stream cut short leaves the cache incomplete, and the next life streams again."""
        if ray.get(cache.status.remote(name))["complete"]:
            items = ray.get(cache.items_for.remote(0, 1, name))
            log.info("%s set: reading cached embeddings (%d batches)", name, len(items))
            yield from (get_batch(item) for item in items)
            return
        if rank == 0:
            ray.get(cache.clear.remote(name))
        for i, batch in enumerate(_stream(w.shard(name), trainer.layout, bs)):
            if rank == 0:
                put_batch(cache, batch, loop.cache_mode, loop.cache_dir, 0, i, name)
            yield batch
        if rank == 0:
            ray.get(cache.mark_complete.remote(name))

    def eval_set(name: str):
        if name not in eval_sets:  # decoded once per worker life, then kept here
            eval_sets[name] = trainer.eval_set(eval_batches(name))
        return eval_sets[name]

    general = (lambda: eval_set("general")) if "general" in loop.eval_sets else None

    def epoch_input(epoch: int) -> EpochInput:
        """Epoch 0 (or a re-stream after a restart that lost the cache) from the streaming shard,
        filling the cache; later epochs from the cache, in the recipe's epoch order."""
        status = ray.get(cache.status.remote())
        t_wall = time.time()
        if epoch > 0 and status["complete"]:
            items = ray.get(cache.items_for.remote(rank, world))
            log.info("epoch %d: reading cached embeddings (%s, %d batches)", epoch, status["mode"], len(items))
            batches = (get_batch(items[i]) for i in epoch_order(len(items), cfg.train.seed, epoch))
            return EpochInput(batches, streamed=False, finish=lambda stats: audit(epoch, stats, t_wall, False, status))
        # A streamed epoch rebuilds the cache from scratch: a restart before the epoch-0 checkpoint
        # was recorded must not append a second copy of the batches.
        if epoch > 0:
            log.info("epoch %d: embedding cache incomplete after a restart; re-streaming from the embedding actors",
                     epoch)
        if rank == 0:
            ray.get(cache.clear.remote())
        w.barrier()
        log.info("epoch %d: streaming embeddings from the producers", epoch)

        def on_batch(i: int, batch: EncodedBatch) -> None:
            put_batch(cache, batch, loop.cache_mode, loop.cache_dir, rank, i)

        def finish(stats) -> None:
            w.barrier()
            if rank == 0:
                ray.get(cache.mark_complete.remote())
            audit(epoch, stats, t_wall, True, status)

        return EpochInput(_stream(w.shard("train"), trainer.layout, bs), True, on_batch, finish)

    def audit(epoch: int, stats, t_wall: float, streamed: bool, status: dict) -> None:
        """What this worker trained on in an epoch: every sample id, once, where and when."""
        if out_dir is None:
            return
        (out_dir / f"samples-epoch{epoch}-rank{rank}.json").write_text(json.dumps(
            {"ids": stats.sample_ids, "started": t_wall, "finished": time.time(), "world": world, "pid": os.getpid(),
             "from_cache": not streamed, "node": ray.get_runtime_context().get_node_id(),
             "producer_nodes": sorted(stats.producer_nodes), "cache_node": status["node"]}))

    def checkpoint(metrics: dict, stats) -> None:
        """The recipe's state after each epoch; the job reads the run's results from the last one."""
        w.checkpoint(trainer, metrics)

    return trainer.fit(stoppable(epoch_input, w.stopped), lambda: eval_set("val"), general, after_epoch=checkpoint)


def stoppable(epoch_input, stopped: Callable[[], bool]):
    """`epoch_input` whose batches end the fit (FitStopped) once `stopped()` says so."""

    def batches(it):
        for batch in it:
            if stopped():
                raise FitStopped("the fit was cancelled")
            yield batch

    def wrapped(epoch: int) -> EpochInput:
        feed = epoch_input(epoch)
        return EpochInput(batches(feed.batches), feed.streamed, feed.on_batch, feed.finish)

    return wrapped
