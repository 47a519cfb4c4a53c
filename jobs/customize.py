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


# What the job's processes (driver, actors, Train workers) run with so that the job's log shows the
# run's own lines: Ray Data logs errors only to the console (everything else to its session file),
# no per-file progress bars from transformers or MLflow downloads.
RAY_DATA_LOGGING = Path(__file__).with_name("ray-data-logging.yaml")
QUIET_ENV = {
    "RAY_DATA_LOGGING_CONFIG": str(RAY_DATA_LOGGING),
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def worker_env() -> dict[str, str]:
    """Environment the job's own workers (Train workers) get: the cache and offline settings, and
    QUIET_ENV. The logging config is named by this file's absolute path: a submitted job's
    working_dir unpacks to the same path on every node (and Ray Train moves its workers' cwd)."""
    env = {k: os.environ[k] for k in ("CARRYON_CACHE", "HF_HUB_OFFLINE") if k in os.environ}
    return {**env, **QUIET_ENV}


def connect_ray(cfg) -> None:
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # Our own progress line replaces Ray Data's per-operator bars, which flood job logs.
    ctx.enable_progress_bars = False
    # Rows reach the trainers in the order the job lists them, so a run is reproducible and trains
    # on the same batches as `carryon train` (Ray Train copies these options into its shards).
    ctx.execution_options.preserve_order = cfg.resources.deterministic
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:  # a submitted job (its runtime env is set by the submission) or an explicit cluster
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
    else:  # a laptop: one local node advertising both node classes
        r = cfg.resources
        env = {k: os.environ[k] for k in ("CARRYON_CACHE", "HF_HUB_OFFLINE") if k in os.environ}
        ray.init(resources={r.inference_resource: 100, r.training_resource: 100},
                 runtime_env={"env_vars": {**env, **QUIET_ENV}}, logging_level=logging.WARNING)


def embed_pipeline(cfg, ds, calib):
    """A lazy Ray Dataset: token rows (a Dataset from jobs/data.py) -> embedding rows from an elastic
    pool of embedding actors."""
    from ray.data import ActorPoolStrategy

    from actors.embedder import EmbeddingProducer

    r = cfg.resources
    bases = [b.model_dump() for b in [cfg.base, *cfg.extra_bases]]
    # `ds` is already in blocks of a few batches (jobs/data.py: _blocks), so nothing but the
    # embedding actors runs here: no CPU task can queue behind actors holding every CPU.
    # One pool running every base, or (model mixing) one pool per base chained: each base is
    # placed and scaled on its own and the bases run concurrently on different batches.
    pools = [None] if len(bases) == 1 or not r.pool_per_base else list(range(len(bases)))
    for i, only in enumerate(pools):
        ds = ds.map_batches(
            EmbeddingProducer,
            fn_constructor_kwargs=dict(base_cfgs=bases, calibration=calib, only=only, last=i == len(pools) - 1),
            batch_size=r.embed_batch_size,
            compute=ActorPoolStrategy(min_size=r.embed_actors_min, max_size=r.embed_actors_max),
            num_cpus=r.embed_cpus,
            num_gpus=r.embed_gpus,
            resources={r.inference_resource: 1},
            # Ray Data restarts a dead pool actor and re-runs its unfinished batches (measured in
            # tests/test_job.py, the fault tests: no sample lost or duplicated).
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


def tune_search(cfg, data, datasets, calib, cache_mode, cache_dir, beside_driver, tracker, out_dir, run_name):
    """The search path of the job (jobs/tune.py): embed once into caches, run the trials, return the
    best trial's (config, calibration, recipe state) and a summary of every trial."""
    import ray

    from carryon_ray.embedding import part_layout

    from .cache import EmbeddingCache
    from .tune import SearchContext, fill_cache, search

    r = cfg.resources
    layout = part_layout(calib.bridges(), calib.dims, calib.base_dtype)
    caches, embedded, t0 = {}, {}, time.perf_counter()
    for name in ("val", "general", "train"):  # one embedding pool at a time on a small cluster
        if name not in datasets:
            continue
        caches[name] = EmbeddingCache.options(scheduling_strategy=beside_driver).remote(cache_mode, f"{cache_dir}/{name}")
        counts = ray.get(fill_cache.options(num_cpus=0, scheduling_strategy=beside_driver).remote(
            datasets[name], caches[name], layout, cfg.train.batch_size, cache_mode, f"{cache_dir}/{name}"))
        embedded[name] = counts["rows"]
        log.info("tune: embedded %s once: %d rows in %d batches, %d tokens", name, counts["rows"], counts["batches"],
                 counts["tokens"])
    tracker.metrics({"tune_embed_seconds": time.perf_counter() - t0})
    exp_id = tracker.client.get_run(tracker.run_id).info.experiment_id if tracker.run_id else None
    ctx = SearchContext(cfg.model_dump(mode="json", exclude={"tune"}), calib, caches, data.n_train, tracker.uri,
                        tracker.run_id, exp_id)
    try:
        found = search(cfg, ctx, cfg.output.storage_path or str(out_dir / "ray-tune"), run_name)
    except RuntimeError as exc:
        raise JobError(str(exc)) from None
    early = sum(1 for t in found.trials if not t["error"] and t["epochs"] < found.cfg.carryon.stages * found.cfg.train.epochs)
    failed = sum(1 for t in found.trials if t["error"])
    tracker.metrics({"tune_trials": len(found.trials), "tune_stopped_early": early, "tune_failed": failed,
                     "tune_best_val_loss": found.best["val_loss"]})
    tracker.text(json.dumps(found.trials, indent=2, default=str), "tune_trials.json")
    for key, value in found.best["overrides"].items():
        tracker.param(f"tune.best.{key}", value)
    best_cfg = found.cfg.model_copy(update={"tune": cfg.tune})
    return best_cfg, calib.subset(best_cfg.layers.shallow), found.state, {
        "trials": found.trials, "best": found.best, "stopped_early": early, "failed": failed,
        "embedded_rows": embedded}


def score_heldout_remote(cfg_json: dict, files: dict[str, bytes]) -> dict | None:
    """On an inference-class node: the held-out comparison of base and base + adapter (the adapter
    travels as its files' bytes, so the node needs no shared filesystem with the driver)."""
    import tempfile

    from carryon_ray.base import FrozenBase
    from carryon_ray.config import CarryOnConfig
    from carryon_ray.evaluation import score_heldout

    cfg = CarryOnConfig.model_validate(cfg_json)
    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            (Path(d) / name).write_bytes(data)
        bases = [FrozenBase.load(b) for b in [cfg.base, *cfg.extra_bases]]
        return score_heldout(bases, d, cfg)


def run(cfg) -> dict:
    """Run one customization; returns its summary. Raises JobError / ConfigError on bad input."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from actors.embedder import calibrate
    from carryon_mlflow.tracking import Tracker, finish_run
    from carryon_ray.base import resolve_base_path
    from carryon_ray.data import DataError
    from carryon_ray.embedding import calibration_rows
    from carryon_ray.recipe import RunPlan, Trainer, report_data, report_heldout, report_padding, write_summary

    from .data import calibration_rows as first_rows, ingest

    from .cache import EmbeddingCache
    from .train_loop import TrainLoopConfig, load_state, train_loop

    from .waiting import ResourceWatch

    out_dir = Path(cfg.output.dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    watch = ResourceWatch(cfg.resources.wait_log_s, cfg.resources.wait_timeout_s)
    tracker = Tracker.for_config(cfg)
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
        # -- data: Ray Data reads, tokenizes, splits and orders; the driver holds no rows --------
        connect_ray(cfg)
        watch.job_id = ray.get_runtime_context().get_job_id()
        watch.start()  # from here on, anything the cluster cannot place is reported (and times out)
        try:
            data = ingest(cfg)
        except DataError as exc:
            raise JobError(str(exc)) from None
        report_data(data.reports, data.profiles, data.n_custom, data.n_replay, tracker.reporter)
        report_padding(*data.padding, data.n_train, tracker.reporter)
        tracker.text("\n".join(r.summary() for r in data.reports.values()), "data_report.txt")
        # -- calibrate the bridge on an inference-class node -----------------------------------
        r = cfg.resources
        calib = ray.get(
            ray.remote(calibrate).options(num_cpus=r.embed_cpus, num_gpus=r.embed_gpus,
                                          resources={r.inference_resource: 1}, max_retries=2).remote(
                [b.model_dump() for b in [cfg.base, *cfg.extra_bases]], cfg.bridge.model_dump(), cfg.layers.shallow,
                first_rows(data.train, calibration_rows(cfg)), cfg.tap_spec(),
            )
        )
        # -- the embedding pipeline -----------------------------------------------------------
        datasets = {"train": embed_pipeline(cfg, data.train, calib), "val": embed_pipeline(cfg, data.val, calib)}
        if data.general is not None:
            datasets["general"] = embed_pipeline(cfg, data.general, calib)
        bpt = calib.bytes_per_token()
        n_tokens = data.train_tokens
        cache_mode = choose_cache(cfg, n_tokens, bpt)
        run_name = f"carryon-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        # Shared storage (s3://, gs://, file://...) when configured: trainers on several nodes read one cache.
        cache_dir = (f"{cfg.output.storage_path.rstrip('/')}/embedding-cache/{run_name}" if cfg.output.storage_path
                     else str(out_dir / "embedding-cache"))
        log.info("embedding cache: %s (%.1f MB of bridge codes for %d tokens at %.0f bytes/token)",
                 "object store" if cache_mode == "memory" else f"disk at {cache_dir}", n_tokens * bpt / 1e6, n_tokens, bpt)
        tracker.param("cache_mode", cache_mode)
        tracker.param("cache_location", "object store" if cache_mode == "memory" else cache_dir)
        tracker.param("bridge_bytes_per_token", f"{bpt:.1f}")
        tracker.param("cache_mb", f"{n_tokens * bpt / 1e6:.1f}")
        # The cache lives on the driver's node: the job cannot outlive that node anyway, while any
        # worker node (an inference node, a spot training node) may vanish mid-run and take an
        # unpinned zero-CPU actor, and the object-store copies it owns, with it.
        beside_driver = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        cache = EmbeddingCache.options(name=f"carryon-cache-{uuid.uuid4().hex[:8]}",
                                       scheduling_strategy=beside_driver).remote(cache_mode, cache_dir)
        # -- train ----------------------------------------------------------------------------
        plan = RunPlan.of(cfg, data.n_train, r.train_workers_min)
        tune_summary = None
        if cfg.tune.trials:  # a search: the base forward runs once, every trial reads the cache
            cfg, calib, state, tune_summary = tune_search(cfg, data, datasets, calib, cache_mode, cache_dir,
                                                         beside_driver, tracker, out_dir, run_name)
            plan = RunPlan.of(cfg, data.n_train)
        else:
            loop = TrainLoopConfig(cfg=cfg.model_dump(mode="json"), calibration=calib, plan=plan, cache=cache,
                                   cache_mode=cache_mode, cache_dir=cache_dir, out_dir=str(out_dir),
                                   eval_sets=[k for k in datasets if k != "train"], mlflow_uri=tracker.uri,
                                   run_id=tracker.run_id)
            workers_max = r.train_workers_max
            trainer = TorchTrainer(
                train_loop,
                train_loop_config={"loop": loop},
                scaling_config=ScalingConfig(
                    num_workers=r.train_workers_min if r.train_workers_min == workers_max
                    else (r.train_workers_min, workers_max),
                    use_gpu=r.train_gpus > 0,
                    resources_per_worker={"CPU": r.train_cpus, "GPU": r.train_gpus, r.training_resource: 1}
                    if r.train_gpus > 0 else {"CPU": r.train_cpus, r.training_resource: 1},
                    elastic_resize_monitor_interval_s=r.resize_check_s,
                ),
                run_config=RunConfig(
                    # A fresh name per job: reusing (name, storage_path) would silently resume an old run.
                    name=run_name,
                    storage_path=cfg.output.storage_path or str(out_dir / "ray-train"),
                    failure_config=FailureConfig(max_failures=r.max_failures),
                    checkpoint_config=CheckpointConfig(num_to_keep=2),
                    # Ray Train's own INFO lines (resource requests, each checkpoint) go to its log files
                    logging_config=LoggingConfig(log_level="WARNING"),
                    worker_runtime_env={"env_vars": worker_env()},
                ),
                datasets=datasets,
                dataset_config=DataConfig(datasets_to_split=["train"]),
            )
            result = trainer.fit()
            if result.error:
                raise JobError(f"training failed: {result.error}")
            state = load_state(result.checkpoint)
        # -- save: the run's results travel in its last checkpoint ------------------------------
        recipe = Trainer(cfg, calib, plan)
        recipe.load_state_dict(state)
        data_summary = [rep.summary() for rep in data.reports.values()]
        adapter_dir = recipe.save(out_dir, cfg.base.name, {"data": data_summary})
        heldout = None
        if cfg.eval.heldout:  # base and base + adapter on held-out prompts, on an inference-class node
            files = {p.name: p.read_bytes() for p in Path(adapter_dir).iterdir() if p.is_file()}
            result = ray.get(ray.remote(score_heldout_remote).options(
                num_cpus=r.embed_cpus, num_gpus=r.embed_gpus, resources={r.inference_resource: 1}, max_retries=2,
            ).remote(cfg.model_dump(mode="json"), files))
            heldout = report_heldout(result, cfg, tracker.reporter)
        summary = {**recipe.summary(), "data": data_summary, "train_sequences": data.n_train,
                   "cache": cache_mode, "cache_location": "object store" if cache_mode == "memory" else cache_dir,
                   "adapter": str(adapter_dir),
                   "heldout": heldout, "tune": tune_summary, "run_id": tracker.run_id,
                   "wall_seconds": round(time.perf_counter() - t_start, 1)}
        summary["model_version"] = finish_run(tracker, cfg, summary, str(adapter_dir))
        write_summary(out_dir, summary)
        tracker.end("FINISHED")
        return summary
    except KeyboardInterrupt:
        tracker.end("FAILED")
        if watch.message:  # the watch ended the wait: say why instead of a traceback
            raise JobError(watch.message) from None
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    finally:
        watch.stop()


def main(argv: list[str] | None = None) -> int:
    from carryon_ray.config import ConfigError, load_config, parse_overrides

    p = argparse.ArgumentParser(prog="python -m jobs.customize", description="Run one carry-on customization on Ray.")
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    args = p.parse_args(argv)
    for k, v in QUIET_ENV.items():  # before Ray Data is imported: it reads its logging config then
        os.environ.setdefault(k, v)
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
    brief = {k: v for k, v in summary.items() if k not in ("history", "train_losses", "last_epoch", "heldout")}
    if summary.get("heldout"):
        brief["heldout"] = {k: v for k, v in summary["heldout"].items() if k != "examples"}
    print("RESULT " + json.dumps(brief))  # the whole summary is summary.json in output.dir
    before, after = summary["val_loss_before"], summary["val_loss_after"]
    if before is not None and after is not None:
        print(f"validation loss {before:.4f} -> {after:.4f} at alpha {summary['alpha']:g}; adapter at {summary['adapter']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
