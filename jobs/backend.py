"""The Ray backend of the customization pipeline (carryon_ray/pipeline.py tells the story): where
each step of a run happens on a Ray cluster.

    data       Ray Data reads, tokenizes, splits, orders and packs by the run's RowPlan (jobs/data.py)
    calibrate  one task on an inference-class node
    fit        embedding producers (actors/service.py: the cluster's shared service, or the job's
               own; elastic, inference-class) streaming bridge codes through the object store
               into TorchTrainer workers on training-class nodes
               (each runs Trainer.fit: jobs/train_loop.py), or a Tune search over a cache filled
               once (jobs/tune.py); the Trainer's state comes back in the last checkpoint
    heldout    one task on an inference-class node
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

from actors.client import Producers, ProducersUnavailable

from .local_cluster import SINGLE_MACHINE_ENV, SINGLE_MACHINE_RAYLET

log = logging.getLogger("carryon.job")

# Ray Train V2 waits for worker health checks between reports; the default interval makes each
# report cost ~2 s, which dominates small runs.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


class JobError(RuntimeError):
    """A run that cannot proceed, with a message meant for the user."""


def _producers(cfg, job: str, scheduling=None):
    """actors/client.py's Producers for this job; a producers setting nothing serves is the job's error."""
    try:
        return Producers(cfg, job, scheduling)
    except ProducersUnavailable as exc:
        raise JobError(str(exc)) from None


# What the job's processes (driver, actors, Train workers) run with so that the job's log shows the
# run's own lines: Ray Data logs errors only to the console (everything else to its session file),
# no per-file progress bars from transformers or MLflow downloads.
RAY_DATA_LOGGING = Path(__file__).with_name("ray-data-logging.yaml")
QUIET_ENV = {
    "RAY_DATA_LOGGING_CONFIG": str(RAY_DATA_LOGGING),
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # the run's page is in the job's first line
}


def worker_env() -> dict[str, str]:
    """Environment the job's own workers (Train workers) get: the cache and offline settings, and
    QUIET_ENV. The logging config is named by this file's absolute path: a submitted job's
    working_dir unpacks to the same path on every node (and Ray Train moves its workers' cwd)."""
    env = {k: os.environ[k] for k in ("CARRYON_CACHE", "HF_HUB_OFFLINE") if k in os.environ}
    return {**env, **QUIET_ENV}


def pinned_env(address: str) -> dict | None:
    """The job's workers find THIS cluster when a Ray helper looks one up by itself.

    Ray Train's placement-group cleaner (a detached actor per run) asks the state API whether the
    controller lives with no address: Ray then takes the machine's newest cluster. Where two
    clusters run on one machine (a laptop's `carryon up` beside a test cluster; CI's two pytest
    workers) it asked the other one, found no controller and exited, or removed the run's placement
    group (its workers die); every run also ended with a 12 s wait for the cleaner to stop. The
    job's runtime env carries RAY_ADDRESS to every process of the job, so the lookup is this
    cluster's. A Ray Client address (ray://) or "auto" is not a GCS address: nothing is pinned.
    A submitted job whose own runtime env names RAY_ADDRESS keeps it (Ray refuses a conflict)."""
    if address == "auto" or "://" in address:
        return None
    injected = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    if "RAY_ADDRESS" in ((injected.get("runtime_env") or {}).get("env_vars") or {}):
        return None
    return {"env_vars": {"RAY_ADDRESS": address}}


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
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING, runtime_env=pinned_env(address))
    else:  # a laptop: one local node advertising both node classes
        r = cfg.resources
        env = {k: os.environ[k] for k in ("CARRYON_CACHE", "HF_HUB_OFFLINE") if k in os.environ}
        ray.init(resources={r.inference_resource: 100, r.training_resource: 100},
                 runtime_env={"env_vars": {**env, **QUIET_ENV, **SINGLE_MACHINE_ENV}}, logging_level=logging.WARNING,
                 _system_config=SINGLE_MACHINE_RAYLET)


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


def tune_search(cfg, data, datasets, calib, cache_mode, cache_dir, beside_driver, tracker, out_dir, run_name,
                embedded_all=lambda: None):
    """The search path of the job (jobs/tune.py): embed once into the cache's sets (then `embedded_all()`:
    the job's own producers are done), run the trials, return the best trial's (config,
    calibration, recipe state) and a summary of every trial."""
    import ray

    from carryon_ray.embedding import part_layout

    from .cache import EmbeddingCache
    from .tune import SearchContext, fill_cache, search

    layout = part_layout(calib.bridges(), calib.dims, calib.base_dtype)
    cache = EmbeddingCache.options(scheduling_strategy=beside_driver).remote(cache_mode, cache_dir)
    embedded, t0 = {}, time.perf_counter()
    for name in ("val", "general", "train"):  # one embedding pool at a time on a small cluster
        if name not in datasets:
            continue
        counts = ray.get(fill_cache.options(num_cpus=0, scheduling_strategy=beside_driver).remote(
            datasets[name], cache, layout, cfg.train.batch_size, cache_mode, cache_dir, name))
        embedded[name] = counts["rows"]
        log.info("tune: embedded %s once: %d rows in %d batches, %d tokens", name, counts["rows"], counts["batches"],
                 counts["tokens"])
    tracker.metrics({"tune_embed_seconds": time.perf_counter() - t0})
    embedded_all()  # the trials read the cache: free the producers' capacity for them
    exp_id = tracker.client.get_run(tracker.run_id).info.experiment_id if tracker.run_id else None
    ctx = SearchContext(cfg.model_dump(mode="json", exclude={"tune"}), calib, cache, sorted(embedded), data.n_train,
                        tracker.uri, tracker.run_id, exp_id)
    try:
        found = search(cfg, ctx, cfg.output.storage_path or str(out_dir / "ray-tune"), run_name)
    except RuntimeError as exc:
        raise JobError(str(exc)) from None
    tracker.metrics({"tune_trials": len(found.trials), "tune_stopped_early": found.stopped_early,
                     "tune_failed": found.failed, "tune_best_val_loss": found.best.val_loss})
    summary = found.summary()
    tracker.text(json.dumps(summary["trials"], indent=2, default=str), "tune_trials.json")
    for key, value in found.best.overrides.items():
        tracker.param(f"tune.best.{key}", value)
    best_cfg = found.cfg.model_copy(update={"tune": cfg.tune})
    return best_cfg, calib.subset(best_cfg.layers.shallow), found.state, {**summary, "embedded_rows": embedded}


def score_heldout_remote(cfg_json: dict, files: dict[str, bytes]) -> dict | None:
    """On an inference-class node: the held-out comparison of base and base + adapter (the adapter
    travels as its files' bytes, so the node needs no shared filesystem with the driver)."""
    from carryon_ray.base import FrozenBase
    from carryon_ray.config import CarryOnConfig
    from carryon_ray.evaluation import score_heldout_files

    cfg = CarryOnConfig.model_validate(cfg_json)
    return score_heldout_files([FrozenBase.load(b) for b in [cfg.base, *cfg.extra_bases]], cfg_json, files)


class RayBackend:
    """The pipeline's steps on a Ray cluster (carryon_ray/pipeline.py tells the story):

      data       Ray Data reads, tokenizes, splits, orders and packs by the RowPlan (jobs/data.py);
                 the driver holds datasets, counts and reports, never the rows
      calibrate  one remote task on an inference-class node
      fit        the embedding pipeline (producers on inference-class nodes, shared or the job's
                 own, streaming bridge codes through the object store) into TorchTrainer workers on training-class
                 nodes (each runs Trainer.fit: jobs/train_loop.py), or a Tune search over a cache
                 filled once (jobs/tune.py); the Trainer's state comes back in the last checkpoint
      heldout    one remote task on an inference-class node

    A context manager: from entering until leaving, a ResourceWatch reports every
    resources.wait_log_s what the cluster cannot place, and ends the wait after
    resources.wait_timeout_s with a JobError naming it."""

    def __init__(self, cfg, tracker):
        from .waiting import ResourceWatch

        self.cfg, self.tracker = cfg, tracker
        self.out_dir = Path(cfg.output.dir).resolve()
        self.watch = ResourceWatch(cfg.resources.wait_log_s, cfg.resources.wait_timeout_s)
        self._producers: Producers | None = None

    def __enter__(self) -> "RayBackend":
        import ray

        self.out_dir.mkdir(parents=True, exist_ok=True)
        check_base(self.cfg)  # before the cluster is asked for anything
        connect_ray(self.cfg)
        self.watch.job_id = ray.get_runtime_context().get_job_id()
        self.watch.address = ray.get_runtime_context().gcs_address
        self.watch.start()  # from here on, anything the cluster cannot place is reported (and times out)
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self.watch.stop()
        if self._producers is not None:
            self._producers.close()
        if self.watch.partial:  # an elastic pool that could not grow to its max: capacity, not a stall
            log.info("ran below its maximum: %s could not all be placed while the rest worked (checks: %s)",
                     ", ".join(self.watch.partial), ", ".join(map(str, self.watch.partial.values())))
        if kind is KeyboardInterrupt and self.watch.message:  # the watch ended the wait: say why
            raise JobError(self.watch.message) from None

    def _remote(self, fn):
        """`fn` as a task on an inference-class node (where the base runs)."""
        import ray

        r = self.cfg.resources
        return ray.remote(fn).options(num_cpus=r.embed_cpus, num_gpus=r.embed_gpus,
                                      resources={r.inference_resource: 1}, max_retries=2)

    def data(self, reporter):
        from carryon_ray.data import DataError
        from carryon_ray.embedding import calibration_rows
        from carryon_ray.pipeline import RunData

        from .data import calibration_rows as first_rows, ingest

        try:
            data = ingest(self.cfg)
        except DataError as exc:
            raise JobError(str(exc)) from None
        self.tracker.text("\n".join(r.summary() for r in data.reports.values()), "data_report.txt")
        return RunData(data.reports, data.profiles, data.n_train, data.n_custom, data.n_replay, data.padding,
                       first_rows(data.train, calibration_rows(self.cfg)), data)

    def producers(self) -> Producers:
        """The job's embedding producers, from calibration until the job ends."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if self._producers is None:
            # The job's own producer service lives on the driver's node, as the cache does (below).
            beside_driver = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            self._producers = _producers(self.cfg, f"job-{uuid.uuid4().hex[:8]}", beside_driver)
        return self._producers

    def calibrate(self, data):
        import ray

        from actors.embedder import calibrate

        cfg = self.cfg
        calib = self.producers().calibrate(data)
        if calib is not None:
            return calib
        return ray.get(self._remote(calibrate).remote(
            [b.model_dump() for b in [cfg.base, *cfg.extra_bases]], cfg.bridge.model_dump(), cfg.layers.shallow,
            data.calibration_rows, cfg.tap_spec()))

    def fit(self, data, calib, reporter):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        run_name = f"carryon-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        # The cache lives on the driver's node: the job cannot outlive that node anyway, while any
        # worker node (an inference node, a spot training node) may vanish mid-run and take an
        # unpinned zero-CPU actor, and the object-store copies it owns, with it.
        beside_driver = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        producers = self.producers()
        reporter.params({"producers": producers.kind})
        try:
            return self._fit(data, calib, reporter, producers, run_name, beside_driver)
        finally:
            seen = producers.seen or producers.describe()
            self.tracker.text(json.dumps(seen, indent=2, default=str), "producers.json")
            log.debug("producers: %s", seen)
            if not self.cfg.eval.heldout:  # else they score it (heldout below), then stop
                producers.close()

    def _fit(self, data, calib, reporter, producers, run_name, beside_driver):
        from carryon_ray.pipeline import Fitted
        from carryon_ray.recipe import RunPlan

        from . import trainers
        from .cache import EmbeddingCache
        from .train_loop import TrainLoopConfig

        cfg, tracker, rows = self.cfg, self.tracker, data.rows
        datasets = {"train": producers.pipeline(rows.train, calib), "val": producers.pipeline(rows.val, calib)}
        if rows.general is not None:
            datasets["general"] = producers.pipeline(rows.general, calib)
        bpt, n_tokens = calib.bytes_per_token(), rows.train_tokens
        cache_mode = choose_cache(cfg, n_tokens, bpt)
        # Shared storage (s3://, gs://, file://...) when configured: trainers on several nodes read one cache.
        cache_dir = (f"{cfg.output.storage_path.rstrip('/')}/embedding-cache/{run_name}" if cfg.output.storage_path
                     else str(self.out_dir / "embedding-cache"))
        where = "object store" if cache_mode == "memory" else cache_dir
        log.debug("embedding cache: %s at %s (%.1f MB of bridge codes for %d tokens at %.0f bytes/token)",
                 cache_mode, where, n_tokens * bpt / 1e6, n_tokens, bpt)
        reporter.params({"cache_mode": cache_mode, "cache_location": where, "cache_mb": f"{n_tokens * bpt / 1e6:.1f}"})
        extra = {"cache": cache_mode, "cache_location": where, "tune": None, "producers": producers.kind}
        if cfg.tune.trials:  # a search: the base forward runs once, every trial reads the cache
            best_cfg, best_calib, state, extra["tune"] = tune_search(cfg, data, datasets, calib, cache_mode, cache_dir,
                                                                    beside_driver, tracker, self.out_dir, run_name,
                                                                    producers.close)
            return Fitted(best_cfg, best_calib, RunPlan.of(best_cfg, data.n_train), state, extra)
        # One cache, a set per dataset: the training set's epochs after the first, and the validation
        # sets for every worker life after the first (a restart or a resize reads them, no re-stream).
        cache = EmbeddingCache.options(name=f"carryon-cache-{uuid.uuid4().hex[:8]}",
                                       scheduling_strategy=beside_driver).remote(cache_mode, cache_dir)
        plan = RunPlan.of(cfg, data.n_train, cfg.resources.train_workers_min)
        loop = TrainLoopConfig(cfg=cfg.model_dump(mode="json"), calibration=calib, plan=plan, cache=cache,
                               cache_mode=cache_mode, cache_dir=cache_dir, out_dir=str(self.out_dir),
                               eval_sets=[k for k in datasets if k != "train"], mlflow_uri=tracker.uri,
                               run_id=tracker.run_id)
        service, why_not, running = trainers.choose(cfg)
        extra["trainers"] = "service" if service is not None else "ray-train"
        reporter.params({"trainers": extra["trainers"]})
        if service is not None:
            log.info("training on the cluster's trainer service (%s)", trainers.TRAINERS_NAME)
            state = trainers.train_on_service(service, loop, service_shards(datasets), cfg.resources.max_failures,
                                              run_name)
        else:
            if running:  # a service runs, and this job's fit is not one it can hold: say so
                log.info("training on Ray Train, not the trainer service: %s", why_not)
            state = train_on_cluster(cfg, loop, datasets, self.out_dir, run_name)
        return Fitted(cfg, calib, plan, state, extra)

    def heldout(self, cfg, adapter_dir):
        """On a producer that already holds the base (no base load), else one task on an
        inference-class node that loads it. The result says which (`scored_on`)."""
        import ray

        if not cfg.eval.heldout:
            return None
        files = {p.name: p.read_bytes() for p in Path(adapter_dir).iterdir() if p.is_file()}
        cfg_json = cfg.model_dump(mode="json")
        producers = self._producers
        if producers is not None:
            out = producers.score_heldout(cfg_json, files)
            producers.close()  # the job's own: done with the node
            if out is not None:
                return {**out, "scored_on": f"{producers.kind} producer"}
        return {**ray.get(self._remote(score_heldout_remote).remote(cfg_json, files)), "scored_on": "task"}


def check_base(cfg) -> None:
    """The base (and any mixed bases) must load before the cluster is asked for anything."""
    from transformers import AutoTokenizer

    from carryon_ray.base import resolve_base_path

    try:
        path, gguf = resolve_base_path(cfg.base)
        tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    except Exception as exc:
        raise JobError(f"base {cfg.base.name!r} cannot be loaded: {exc}") from None
    check_tokenizers(cfg, tok)


def ingest_options():
    """Ray Data options for the trainers' datasets: the driver's (preserve_order is
    resources.deterministic), given explicitly. Train's default copies every option, the
    deprecated `exclude_resources` among them, and Ray Data warns about it on every run."""
    from ray.data import DataContext, ExecutionOptions

    now = DataContext.get_current().execution_options
    return ExecutionOptions(resource_limits=now.resource_limits, preserve_order=now.preserve_order,
                            verbose_progress=now.verbose_progress)


def train_on_cluster(cfg, loop, datasets, out_dir, run_name) -> dict:
    """TorchTrainer over training-class workers, each running the Trainer's epochs (jobs/train_loop.py);
    returns the Trainer's state from the last checkpoint."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .train_loop import load_state, train_loop

    r = cfg.resources
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"loop": loop},
        scaling_config=ScalingConfig(
            num_workers=r.train_workers_min if r.train_workers_min == r.train_workers_max
            else (r.train_workers_min, r.train_workers_max),
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
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ingest_options()),
    )
    result = trainer.fit()
    if result.error:
        raise JobError(f"training failed: {result.error}")
    return load_state(result.checkpoint)


def service_shards(datasets: dict):
    """A fit on the trainer service reads each dataset whole, one reader per try (its process runs
    each dataset's execution itself: no split coordinator for one reader), readied as Ray Train's
    DataConfig readies a one-worker run's datasets."""
    for name, ds in datasets.items():
        if ds.name is None:
            ds.set_name(name)
        ds.context.execution_options = ingest_options()
    return lambda: {name: ds.iterator() for name, ds in datasets.items()}
