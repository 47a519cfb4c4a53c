"""The customization job: base forward on inference-class actors, carry-on fitting on Ray Train.

    ray job submit --working-dir . -- python -m jobs.customize --config configs/demo.yaml

The story of one run:
  setup      connect to Ray, open the MLflow run, log the config
  data       tokenize, split, count and report malformed rows
  calibrate  fit the bridge on an inference-class node (one remote task), get base fingerprints
  pipeline   Ray Data: token rows -> EmbeddingProducer actor pool (elastic, inference-class)
             -> bridge codes streamed through the object store with backpressure
  train      TorchTrainer on training-class workers (elastic range, retries, checkpoints each
             epoch); epoch 0 streams, later epochs read the embedding cache; alpha is chosen on
             validation data after every epoch
  save       adapter from the final checkpoint, figures, artifacts, registry alias
A failure anywhere marks the MLflow run FAILED and exits non-zero with one clear message.
"""

from __future__ import annotations

import argparse
import json
import random
import logging
import os
import sys
import time
import uuid
from pathlib import Path

log = logging.getLogger("carryon.job")

# Ray Train V2 waits for worker health checks between reports; the default interval makes each
# report cost ~2 s, which dominates small runs.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


class JobError(RuntimeError):
    """A run that cannot proceed, with a message meant for the user."""


def connect_ray(cfg) -> None:
    import ray
    import ray.data

    # Our own progress line replaces Ray Data's per-operator bars, which flood job logs.
    ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:  # a submitted job (its runtime env is set by the submission) or an explicit cluster
        ray.init(address=address, log_to_driver=True)
    else:  # a laptop: one local node advertising both node classes
        r = cfg.resources
        env = {k: os.environ[k] for k in ("CARRYON_CACHE", "HF_HUB_OFFLINE") if k in os.environ}
        ray.init(resources={r.inference_resource: 100, r.training_resource: 100}, runtime_env={"env_vars": env})


def embed_pipeline(cfg, rows: list[dict], calib: dict, dims: list[list[int]]):
    """A lazy Ray Dataset: token rows -> bridge codes from an elastic pool of embedding actors."""
    import ray.data
    from ray.data import ActorPoolStrategy

    from actors.embedder import EmbeddingProducer

    r = cfg.resources
    bases = [b.model_dump() for b in [cfg.base, *cfg.extra_bases]]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // r.embed_batch_size, 64)))
    # One pool running every base, or (model mixing) one pool per base chained: each base is
    # placed and scaled on its own and the bases run concurrently on different batches.
    pools = [None] if len(bases) == 1 or not r.pool_per_base else list(range(len(bases)))
    for i, only in enumerate(pools):
        ds = ds.map_batches(
            EmbeddingProducer,
            fn_constructor_kwargs=dict(base_cfgs=bases, bridge_bits=cfg.bridge.bits, bridge_tensors=calib["bridges"],
                                       dims=dims, shallow=cfg.layers.shallow, only=only, last=i == len(pools) - 1),
            batch_size=r.embed_batch_size,
            compute=ActorPoolStrategy(min_size=r.embed_actors_min, max_size=r.embed_actors_max),
            num_cpus=r.embed_cpus,
            num_gpus=r.embed_gpus,
            resources={r.inference_resource: 1},
            # Ray Data restarts a dead pool actor and re-runs its unfinished batches (measured in
            # tests/test_faults.py: no sample lost or duplicated).
        )
    return ds


def check_tokenizers(cfg, tok) -> None:
    """Mixed bases must share base's tokenizer (same vocabulary and special tokens): their states
    are averaged per token position. Checked before the cluster is asked for anything."""
    from transformers import AutoTokenizer

    from carryon_ray.base import tokenizer_sha, resolve_base_path

    want = tokenizer_sha(tok)
    for i, extra in enumerate(cfg.extra_bases):
        try:
            path, gguf = resolve_base_path(extra)
            other = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
        except Exception as exc:
            raise JobError(f"extra_bases[{i}] {extra.name!r} cannot be loaded: {exc}") from None
        if tokenizer_sha(other) != want:
            raise JobError(f"extra_bases[{i}] {extra.name!r} does not share the tokenizer of base {cfg.base.name!r} "
                           f"(vocabulary {len(other)} vs {len(tok)} or different tokens): mixed bases must use one "
                           "tokenizer; remove it or pick a base of the same family")


def choose_cache(cfg, n_tokens: int, bytes_per_token: float) -> str:
    import ray

    if cfg.resources.cache != "auto":
        return cfg.resources.cache
    store = ray.cluster_resources().get("object_store_memory", 0)
    need = n_tokens * bytes_per_token
    return "memory" if need < 0.25 * store else "disk"


def plot_figures(tracker, cfg, final: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = tracker.history("train_loss_step")
    val = tracker.history("val_loss")
    if train or val:
        fig, ax = plt.subplots(figsize=(6, 4))
        if train:
            ax.plot(*zip(*train), label="train loss", alpha=0.7)
        if val:
            ax.plot(*zip(*val), "o-", label="validation loss (chosen alpha)")
        ax.set_xlabel("step")
        ax.set_ylabel("cross entropy")
        ax.legend()
        tracker.figure(fig, "figures/loss_curves.png")
        plt.close(fig)
    sweep = sorted(cfg.alpha.general_sweep)
    if all(f"sweep_general_{a:g}" in final for a in sweep):
        fig, ax = plt.subplots(figsize=(6, 4))
        cust = [final[f"sweep_val_{a:g}"] for a in sweep]
        gen = [final[f"sweep_general_{a:g}"] for a in sweep]
        ax.plot(sweep, cust, "o-", label="customization validation loss")
        ax.plot(sweep, gen, "s-", label="general-domain loss")
        ax.axvline(final["alpha"], color="grey", ls="--", label=f"chosen alpha {final['alpha']:g}")
        chosen = final.get(f"val_general_alpha_{final['alpha']:g}")
        if chosen is not None:  # the operating point the (guarded) search picked
            ax.plot([final["alpha"]], [chosen], "r*", ms=14, label="chosen point (general loss)")
        if cfg.alpha.general_guard is not None and "val_general_alpha_0" in final:
            ax.axhline(final["val_general_alpha_0"] + cfg.alpha.general_guard, color="red", ls=":",
                       label=f"guard: base + {cfg.alpha.general_guard:g}")
        ax.set_xlabel("alpha")
        ax.set_ylabel("cross entropy")
        ax.legend()
        tracker.figure(fig, "figures/alpha_tradeoff.png")
        plt.close(fig)


def run(cfg) -> dict:
    """Run one customization; returns a summary dict. Raises JobError / ConfigError on bad input."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from actors.embedder import calibrate
    from carryon_ray.adapter import save_adapter
    from carryon_ray.base import resolve_base_path
    from carryon_ray.bridge import bridges_from_state
    from carryon_ray.data import DataError, load_splits
    from carryon_ray.train import build_carryon, calibration_rows, source_dims

    from .cache import EmbeddingCache
    from .tracking import Tracker, tracking_uri
    from .train_loop import STATE_FILE, train_loop

    out_dir = Path(cfg.output.dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(cfg.mlflow.tracking_uri)
    tracker = Tracker(uri, cfg.mlflow.experiment, cfg.mlflow.run_name)
    tracker.start(cfg.model_dump(mode="json"), tags={"carryon.base": cfg.base.name})
    t_start = time.perf_counter()
    try:
        # -- setup: check the base and the data before asking the cluster for anything ---------
        from transformers import AutoTokenizer

        try:
            path, gguf = resolve_base_path(cfg.base)
            tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
        except Exception as exc:
            raise JobError(f"base {cfg.base.name!r} cannot be loaded: {exc}") from None
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        check_tokenizers(cfg, tok)
        # -- data -----------------------------------------------------------------------------
        try:
            splits = load_splits(tok, cfg.data, seed=cfg.train.seed)
        except DataError as exc:
            raise JobError(str(exc)) from None
        roles = (["train"] + (["val"] if cfg.data.val else []) + (["general"] if cfg.data.general_val else [])
                 + (["replay"] if cfg.data.replay else []))
        for role, rep in zip(roles, splits.reports):
            log.info("data (%s) %s", role, rep.summary())
            tracker.metrics(rep.metrics(f"data_{role}"))
        tracker.text("\n".join(r.summary() for r in splits.reports), "data_report.txt")
        connect_ray(cfg)

        def rows(examples):
            return [{"sample_id": i, "input_ids": e.input_ids, "labels": e.labels} for i, e in enumerate(examples)]

        train_rows, val_rows = rows(splits.train), rows(splits.val)
        n_custom = len(train_rows)
        if splits.replay:  # replay rows follow the customization rows: ids >= n_custom mark them
            train_rows += [{**r, "sample_id": n_custom + r["sample_id"]} for r in rows(splits.replay)]
            log.info("replay: %d general-domain sequences mixed into %d customization sequences (KL to the base, "
                     "weight %g)", len(splits.replay), n_custom, cfg.train.kl_weight)
            tracker.metrics({"replay_sequences": len(splits.replay)})
            random.Random(cfg.train.seed).shuffle(train_rows)  # interleave, so every batch may hold replay
        # -- calibrate the bridge on an inference-class node -----------------------------------
        r = cfg.resources
        calib_rows = train_rows[: calibration_rows(cfg)]
        calib = ray.get(
            ray.remote(calibrate).options(num_cpus=r.embed_cpus, num_gpus=r.embed_gpus,
                                          resources={r.inference_resource: 1}, max_retries=2).remote(
                [b.model_dump() for b in [cfg.base, *cfg.extra_bases]], cfg.bridge.model_dump(), cfg.layers.shallow,
                {"input_ids": [x["input_ids"] for x in calib_rows], "labels": [x["labels"] for x in calib_rows]},
            )
        )
        dims = source_dims(calib["hidden_sizes"], cfg.layers.shallow)
        # -- the embedding pipeline -----------------------------------------------------------
        datasets = {"train": embed_pipeline(cfg, train_rows, calib, dims), "val": embed_pipeline(cfg, val_rows, calib, dims)}
        if splits.general:
            datasets["general"] = embed_pipeline(cfg, rows(splits.general), calib, dims)
        import torch

        bridges = bridges_from_state(cfg.bridge.bits, dims, {k: torch.tensor(v) for k, v in calib["bridges"].items()})
        bpt = sum(br.bytes_per_token(d, getattr(torch, calib["dtype"])) for brs, ds in zip(bridges, dims) for br, d in zip(brs, ds))
        n_tokens = sum(len(x["input_ids"]) for x in train_rows)
        cache_mode = choose_cache(cfg, n_tokens, bpt)
        cache_dir = str(out_dir / "embedding-cache")
        log.info("embedding cache: %s (%.1f MB of bridge codes for %d tokens at %.0f bytes/token)",
                 "object store" if cache_mode == "memory" else f"disk at {cache_dir}", n_tokens * bpt / 1e6, n_tokens, bpt)
        tracker.param("cache_mode", cache_mode)
        tracker.param("bridge_bytes_per_token", f"{bpt:.1f}")
        # The cache lives on the driver's node: the job cannot outlive that node anyway, while any
        # worker node (an inference node, a spot training node) may vanish mid-run and take an
        # unpinned zero-CPU actor, and the object-store copies it owns, with it.
        beside_driver = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        cache = EmbeddingCache.options(name=f"carryon-cache-{uuid.uuid4().hex[:8]}",
                                       scheduling_strategy=beside_driver).remote(cache_mode, cache_dir)
        # -- train ----------------------------------------------------------------------------
        workers_max = r.train_workers_max
        # Each worker gets an equal share of rows (Ray Data's equal split), in batches of batch_size.
        steps_per_epoch = max(1, -(-(len(train_rows) // r.train_workers_min) // cfg.train.batch_size))
        per_stage = cfg.train.epochs * steps_per_epoch  # growing in depth: every stage gets train.epochs
        total = min(cfg.train.max_steps or 10**9, cfg.carryon.stages * per_stage)
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={
                "cfg": cfg.model_dump(mode="json"), "meta": {k: calib[k] for k in ("hidden_sizes", "vocab_size", "dtype")},
                "bridges": calib["bridges"], "total_steps": total, "steps_per_stage": per_stage, "cache": cache, "cache_mode": cache_mode,
                "cache_dir": cache_dir, "out_dir": str(out_dir), "eval_sets": list(datasets), "n_custom": n_custom,
                "mlflow": {"uri": uri, "run_id": tracker.run_id},
            },
            scaling_config=ScalingConfig(
                num_workers=r.train_workers_min if r.train_workers_min == workers_max else (r.train_workers_min, workers_max),
                use_gpu=r.train_gpus > 0,
                resources_per_worker={"CPU": r.train_cpus, "GPU": r.train_gpus, r.training_resource: 1}
                if r.train_gpus > 0 else {"CPU": r.train_cpus, r.training_resource: 1},
                elastic_resize_monitor_interval_s=r.resize_check_s,
            ),
            run_config=RunConfig(
                # A fresh name per job: reusing (name, storage_path) would silently resume an old run.
                name=f"carryon-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
                storage_path=cfg.output.storage_path or str(out_dir / "ray-train"),
                failure_config=FailureConfig(max_failures=r.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
            datasets=datasets,
            dataset_config=DataConfig(datasets_to_split=["train"]),
        )
        result = trainer.fit()
        if result.error:
            raise JobError(f"training failed: {result.error}")
        final = result.metrics or {}
        # -- save -----------------------------------------------------------------------------
        with result.checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, weights_only=True)
        model = build_carryon(cfg, calib["hidden_sizes"], calib["vocab_size"], stages=state["stages"])
        model.load_state_dict(state["model"])
        history = [h for h in tracker.history("val_loss")]
        before = next((v for _, v in tracker.history("val_loss_base")), None)
        summary = {
            "val_loss_before": before, "val_loss_after": final.get("val_loss"), "alpha": state["alpha"],
            "alphas": [float(a) for a in model.alphas], "stages": state["stages"],
            "steps": state["step"], "epochs": state["epoch"] + 1, "cache": cache_mode,
            "last_epoch": {k: final.get(k) for k in ("epoch_seconds", "first_batch_wait_s", "input_wait_fraction",
                                                      "from_cache", "producer_tokens_per_s", "train_tokens_per_s")},
            "data": [rep.summary() for rep in splits.reports],
        }
        adapter_dir = save_adapter(out_dir / "adapter", model, bridges, cfg.layers.shallow, calib["fingerprints"],
                                   cfg.base.name, summary)
        plot_figures(tracker, cfg, {**final, "alpha": state["alpha"]})
        tracker.artifacts(str(adapter_dir), "adapter")
        version = None
        if cfg.mlflow.register_as:
            tags = {"carryon.shared": str(cfg.mlflow.shared).lower(), "carryon.base": cfg.base.name}
            if cfg.mlflow.owner:
                tags["carryon.owner"] = cfg.mlflow.owner
            version = tracker.register(cfg.mlflow.register_as, cfg.mlflow.alias, "adapter", tags)
        wall = time.perf_counter() - t_start
        tracker.metrics({"wall_seconds": wall})
        summary.update({"adapter": str(adapter_dir), "run_id": tracker.run_id, "model_version": version,
                        "wall_seconds": round(wall, 1), "val_history": history})
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        tracker.end("FINISHED")
        return summary
    except BaseException:
        tracker.end("FAILED")
        raise


def main(argv: list[str] | None = None) -> int:
    from carryon_ray.cli import parse_overrides
    from carryon_ray.config import ConfigError, load_config

    p = argparse.ArgumentParser(prog="python -m jobs.customize", description="Run one carry-on customization on Ray.")
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, parse_overrides(args.set))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = run(cfg)
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("RESULT " + json.dumps({k: v for k, v in summary.items() if k != "val_history"}))
    before, after = summary["val_loss_before"], summary["val_loss_after"]
    if before is not None and after is not None:
        print(f"validation loss {before:.4f} -> {after:.4f} at alpha {summary['alpha']:g}; adapter at {summary['adapter']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
