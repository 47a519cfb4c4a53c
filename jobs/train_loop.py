"""The Ray Train worker loop: fit the carry-on on bridge codes streamed from the embedding actors.

Runs on training-class nodes under `TorchTrainer`. It never loads the base: only its output head
(for an inherited head) is read from the checkpoint files. Per epoch:

  1. batches come from the streaming dataset shard (epoch 0, or after a restart that lost the
     cache) or from the embedding cache (later epochs);
  2. each batch goes through `carryon_ray.train.train_step`, the same step as the in-process
     trainer (DDP across workers);
  3. every alpha candidate is scored on validation data from one carry-on forward, the best is
     kept for the next epoch, and a checkpoint (model, optimizer, scheduler, alpha search, epoch,
     samples consumed) is reported.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch

from carryon_ray.base import load_head
from carryon_ray.bridge import bridges_from_state
from carryon_ray.config import CarryOnConfig
from carryon_ray.embedding import decode_sources, from_rows, part_layout
from carryon_ray.train import (AlphaSearch, build_carryon, evaluate, gate_mean, grow_stage, make_optimizer,
                                router_dropout_at, source_dims, stage_digest, train_step)

from .cache import get_batch, put_batch
from .tracking import log_metrics, log_params

log = logging.getLogger("carryon.train")

STATE_FILE = "state.pt"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _batches_from_shard(shard, batch_size: int, layout):
    """Yield (encoded, labels, sample_ids, producer stats, wait seconds) from a streaming shard."""
    it = iter(shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2))
    while True:
        t0 = time.perf_counter()
        try:
            rows = next(it)
        except StopIteration:
            return
        wait = time.perf_counter() - t0
        enc, labels = from_rows(rows, layout)
        stats = (int(np.sum(rows["length"])), float(np.sum(rows["embed_seconds"])), {n for chain in rows["producer_node"] for n in chain.split(",")})
        yield enc, labels, [int(s) for s in rows["sample_id"]], stats, wait


def _pack(enc, labels, ids) -> dict[str, torch.Tensor]:
    return {**enc, "labels": labels, "sample_id": torch.tensor(ids, dtype=torch.long)}


def _unpack(batch):
    labels, ids = batch["labels"], batch["sample_id"].tolist()
    enc = {k: v for k, v in batch.items() if k not in ("labels", "sample_id")}
    return enc, labels, ids


def train_loop(config: dict) -> None:
    # -- setup ----------------------------------------------------------------------------------
    cfg = CarryOnConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not log.handlers:  # Ray configures the root logger; give ours its own handler and prefix
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(f"[trainer {rank}] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    torch.manual_seed(cfg.train.seed)
    meta = config["meta"]
    base_dtype = getattr(torch, meta["dtype"])
    dims = source_dims(meta["hidden_sizes"], cfg.layers.shallow)
    bridges = bridges_from_state(cfg.bridge.bits, dims, {k: torch.tensor(np.asarray(v)) for k, v in config["bridges"].items()})
    layout = part_layout(bridges, dims, base_dtype)
    head_w = head_b = None
    if cfg.head.kind == "inherited":
        head_w, head_b = load_head(cfg.base)
    total, per_stage = config["total_steps"], config["steps_per_stage"]
    epochs_per_stage = cfg.train.epochs
    epoch0, step, stage_start = 0, 0, 0
    ckpt = ray.train.get_checkpoint()
    state = None
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, weights_only=True)
    # Growing in depth: the run starts with one stage; a resumed run rebuilds as many as it had.
    model = build_carryon(cfg, meta["hidden_sizes"], meta["vocab_size"], head_w, head_b,
                          stages=state["stages"] if state else 1)
    stage_steps = min(per_stage, total)
    if state:
        stage_start = state["stage_start"]
        stage_steps = min(per_stage, total - stage_start)
    opt, sched = make_optimizer(model, cfg, stage_steps)
    search = AlphaSearch.from_config(cfg)
    if state:  # resume: model, optimizer, scheduler, alpha search, epoch
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        search.current, search.candidates_list = state["alpha"], list(state["alpha_list"])
        epoch0, step = state["epoch"] + 1, state["step"]
        log.info("resumed from checkpoint after epoch %d (step %d, alpha %.4g)", state["epoch"], step, search.current)

    def wrap(m):
        if world == 1:
            return m
        # Routed experts that saw no token in a step have no gradient: DDP must be told.
        return ray.train.torch.prepare_model(m, move_to_device=False, parallel_strategy_kwargs={
            "broadcast_buffers": False, "find_unused_parameters": cfg.carryon.experts > 0})

    ddp = wrap(model)
    cache = config["cache"]
    cache_mode, cache_dir = config["cache_mode"], config["cache_dir"]
    out_dir = Path(config["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    chunk = cfg.train.loss_chunk
    n_custom = config.get("n_custom", 1 << 62)  # sample ids at or above it are replay rows
    has_replay = bool(cfg.data.replay)
    train_shard = ray.train.get_dataset_shard("train")
    val_cache: dict[str, list] = {}

    def eval_set(name: str):
        if name not in val_cache:  # validation sets stream once per worker life, then stay local
            shard = ray.train.get_dataset_shard(name)
            val_cache[name] = [
                (decode_sources(bridges, enc, dims, base_dtype), labels)
                for enc, labels, _, _, _ in _batches_from_shard(shard, cfg.train.batch_size, layout)
            ]
        return val_cache[name]

    mlflow_uri, run_id = config["mlflow"]["uri"], config["mlflow"]["run_id"]

    def track(metrics: dict, at: int) -> None:
        if rank == 0:
            log_metrics(mlflow_uri, run_id, metrics, at)

    if epoch0 == 0 and rank == 0:
        before = evaluate(model, eval_set("val"), [0.0], chunk)[0.0]
        log.info("validation loss of the base (alpha = 0): %.4f", before)
        track({"val_loss_base": before}, 0)
    # -- loop: epochs of stage 0, then of each grown stage ---------------------------------------
    for epoch in range(epoch0, cfg.carryon.stages * epochs_per_stage):
        if step >= total:
            break
        stage = epoch // epochs_per_stage
        if stage >= len(model.stages):  # the previous stage is done: freeze it and grow a new one
            digest = stage_digest(model, stage - 1)
            grow_stage(model, cfg)
            stage_start, stage_steps = step, min(per_stage, total - step)
            opt, sched = make_optimizer(model, cfg, stage_steps)
            search = AlphaSearch.from_config(cfg)
            ddp = wrap(model)
            log.info("stage %d: grown on top of %d frozen stage(s) (stage %d sha256 %s)", stage, stage, stage - 1, digest[:12])
            if rank == 0:
                log_params(mlflow_uri, run_id, {f"stage_{stage - 1}_sha256": digest})
        status = ray.get(cache.status.remote())
        from_cache = epoch > 0 and status["complete"]
        if not from_cache:
            # A streamed epoch rebuilds the cache from scratch: a restart before the epoch-0
            # checkpoint was recorded must not append a second copy of the batches.
            if epoch > 0:
                log.info("epoch %d: embedding cache incomplete after a restart; re-streaming from the embedding actors", epoch)
            if rank == 0:
                ray.get(cache.clear.remote())
            if world > 1:
                torch.distributed.barrier()
        if from_cache:
            log.info("epoch %d: reading cached embeddings (%s, %d batches)", epoch, status["mode"], status["batches"])
            source = ((*_unpack(get_batch(item)), None, 0.0) for item in ray.get(cache.items_for.remote(rank, world)))
        else:
            log.info("epoch %d: streaming embeddings from the actor pool", epoch)
            source = _batches_from_shard(train_shard, cfg.train.batch_size, layout)
        consumed, losses, tokens, wait_s, t_epoch, t_wall = [], [], 0, 0.0, time.perf_counter(), time.time()
        first_wait = 0.0
        model.expert_usage(reset=True)  # count this epoch's training routes only (not validation forwards)
        prod_tok, prod_s, prod_nodes = 0, 0.0, set()
        replay_rows, kls = 0, []
        for i, (enc, labels, ids, stats, wait) in enumerate(source):
            if step >= total:
                break
            if not from_cache:
                put_batch(cache, _pack(enc, labels, ids), cache_mode, cache_dir, rank, i)
                prod_tok, prod_s = prod_tok + stats[0], prod_s + stats[1]
                prod_nodes |= stats[2]
            consumed += ids
            wait_s += wait
            first_wait = wait if i == 0 else first_wait
            replay = torch.tensor([i >= n_custom for i in ids]) if has_replay else None
            router_dropout_at(model, step - stage_start, stage_steps)
            out = train_step(ddp, opt, sched, decode_sources(bridges, enc, dims, base_dtype), labels, chunk,
                             cfg.train.grad_clip, replay, cfg.train.kl_weight, cfg.train.kl_top_k, enc["attention_mask"])
            replay_rows += out["replay_rows"]
            kls.append(out["kl"])
            step += 1
            losses.append(out["loss"])
            tokens += out["tokens"]
            track({"train_loss_step": out["loss"], "lr": sched.get_last_lr()[0]}, step)
            if rank == 0 and step % 5 == 0:
                el = time.perf_counter() - t_epoch
                per_step = el / (i + 1)
                log.info("progress: epoch %d step %d/%d samples %d loss %.4f ETA %.0fs", epoch, step, total,
                         len(consumed), out["loss"], per_step * max(0, total - step))
        if not from_cache and world > 1:
            torch.distributed.barrier()
        if not from_cache and rank == 0:
            ray.get(cache.mark_complete.remote())
        # An audit of what this worker trained on: every sample id, once per epoch, and when.
        (out_dir / f"samples-epoch{epoch}-rank{rank}.json").write_text(json.dumps(
            {"ids": consumed, "started": t_wall, "finished": time.time(), "world": world, "from_cache": from_cache,
             "node": ray.get_runtime_context().get_node_id(), "producer_nodes": sorted(prod_nodes),
             "cache_node": status["node"]}))
        el = time.perf_counter() - t_epoch
        usage = model.expert_usage()  # routed slots per expert in this epoch's training (this worker)
        # -- choose alpha on validation data ------------------------------------------------------
        cands = search.candidates()
        val_losses = evaluate(model, eval_set("val"), cands, chunk)
        general_losses = evaluate(model, eval_set("general"), sorted({0.0, *cands}), chunk) \
            if "general" in config["eval_sets"] else None
        alpha = search.choose(val_losses, general_losses, general_losses[0.0] if general_losses else None)
        model.set_alpha(alpha)
        metrics = {
            "epoch": epoch, "stage": stage, "step": step, "alpha": alpha, f"alpha_stage_{stage}": alpha,
            "val_loss": val_losses[alpha],
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "train_tokens_per_s": tokens / max(el, 1e-9),
            "input_wait_fraction": wait_s / max(el, 1e-9),
            "epoch_seconds": el, "first_batch_wait_s": first_wait,
            "samples": len(consumed), "from_cache": int(from_cache),
            "peak_rss_mb": _peak_rss_mb(),
            **{f"val_loss_alpha_{a:g}": v for a, v in val_losses.items()},
        }
        if general_losses:  # both losses per candidate: the guarded choice is auditable in MLflow
            metrics.update({f"val_general_alpha_{a:g}": v for a, v in general_losses.items()})
            metrics["general_loss_change"] = general_losses[alpha] - general_losses[0.0]
        for layer, shares in enumerate(usage):
            metrics.update({f"expert_share_l{layer}_e{e}": v for e, v in enumerate(shares)})
            metrics[f"expert_max_share_l{layer}"] = max(shares)
        if has_replay:
            metrics.update({"replay_rows": replay_rows, "train_kl": float(np.mean(kls)) if kls else 0.0})
        gates = {name: gate_mean(model, eval_set(name)) for name in ("val", "general") if name in config["eval_sets"]}
        metrics.update({f"gate_mean_{name}": g for name, g in gates.items() if g is not None})
        if prod_s > 0:
            metrics["producer_tokens_per_s"] = prod_tok / prod_s
        if "general" in config["eval_sets"]:
            sweep = cfg.alpha.general_sweep
            custom = evaluate(model, eval_set("val"), sweep, chunk)
            general = evaluate(model, eval_set("general"), sweep, chunk)
            metrics.update({f"sweep_val_{a:g}": custom[a] for a in sweep})
            metrics.update({f"sweep_general_{a:g}": general[a] for a in sweep})
        log.info("epoch %d: val loss %s -> alpha %.4g", epoch, {f"{a:g}": round(v, 4) for a, v in val_losses.items()}, alpha)
        track(metrics, step)
        # -- checkpoint ---------------------------------------------------------------------------
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                torch.save({
                    "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "alpha": search.current, "alpha_list": search.candidates_list, "epoch": epoch, "step": step,
                    "samples_consumed": len(consumed), "stages": len(model.stages), "stage_start": stage_start,
                }, os.path.join(d, STATE_FILE))
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)
        if step >= total:
            break
