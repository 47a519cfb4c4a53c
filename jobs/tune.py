"""Search over the embedding cache with Ray Tune: the base forward runs once, every trial trains a
carry-on on the same cached bridge codes.

    embed     one Ray task per dataset streams the embedding actors' output into an EmbeddingCache
              (the object store, or shared storage): the only base forward of the search
    trials    `tune.trials` samples of `tune.space` (any dotted config fields: kind, width, learning
              rate and schedule, epochs, kl_weight, shallow layers among those embedded, ...), each a
              Ray Tune trial on a training-class unit running the one recipe (carryon_ray/recipe.py)
              on cached batches, reporting every epoch; ASHA stops the weak ones early; concurrency
              is bounded by the training units the cluster has (more training nodes, more trials)
    record    every trial is an MLflow child run of the job's run (params, curves, chosen alpha); a
              trial that fails is reported and does not fail the search
    keep      the best trial (lowest validation loss at its chosen alpha) is rebuilt from its last
              checkpoint; the job saves and registers that adapter
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass

import ray

from carryon_ray.config import CarryOnConfig, apply_overrides, validate_config
from carryon_ray.embedding import Calibration, EncodedBatch, from_rows
from carryon_ray.recipe import NullReporter, RunPlan, Trainer, cached_epochs
from carryon_mlflow.tracking import MlflowReporter, flatten, log_params

from .cache import get_batch, put_batch
from .train_loop import load_state, report_state

log = logging.getLogger("carryon.job")


@ray.remote
def fill_cache(ds, cache, layout: dict, batch_size: int, mode: str, directory: str | None, name: str) -> dict:
    """Stream an embedding dataset into set `name` of the cache, batch by batch (the search's one base forward).
    Returns the producer's counts for the job log."""
    tokens, seconds, batches, n = 0, 0.0, 0, 0
    for i, rows in enumerate(ds.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2)):
        batch = from_rows(rows, layout)
        put_batch(cache, batch, mode, directory, 0, i, name)
        tokens, seconds, batches = tokens + batch.produced_tokens, seconds + batch.produced_seconds, batches + 1
        n += len(batch.sample_ids)
    ray.get(cache.mark_complete.remote(name))
    return {"rows": n, "batches": batches, "tokens": tokens, "producer_seconds": seconds}


@dataclass
class SearchContext:
    """What every trial is handed: the job's config, the calibration, the filled cache (an actor
    handle) and where to record. Small: the data stays in the cache."""

    cfg: dict
    calibration: Calibration
    cache: object  # the EmbeddingCache actor
    sets: list  # its filled sets: "train", "val" (and "general")
    n_train: int
    mlflow_uri: str | None
    parent_run_id: str | None
    experiment_id: str | None


def trial_config(base: dict, overrides: dict) -> CarryOnConfig:
    return validate_config(apply_overrides(copy.deepcopy(base), overrides), "tune trial")


def search_space(cfg: CarryOnConfig) -> dict:
    """tune.space as Ray Tune samplers: a list is a choice, {min, max, log} a range."""
    from ray import tune

    space = {}
    for key, spec in cfg.tune.space.items():
        if isinstance(spec, list):
            space[key] = tune.choice(spec)
        elif spec.get("log"):
            space[key] = tune.loguniform(spec["min"], spec["max"])
        else:
            space[key] = tune.uniform(spec["min"], spec["max"])
    return space


def run_trial(overrides: dict, ctx: SearchContext) -> None:
    """One trial: the recipe on cached batches, an epoch per Tune report."""
    from ray import tune

    from carryon_ray.base import load_head

    cfg = trial_config(ctx.cfg, overrides)
    calib = ctx.calibration.subset(cfg.layers.shallow)
    head_w, head_b = load_head(cfg.base) if cfg.head.kind == "inherited" else (None, None)
    run_id = None
    reporter = NullReporter()
    if ctx.mlflow_uri and ctx.parent_run_id:  # a child run of the job's run: the MLflow UI compares trials
        from mlflow.tracking import MlflowClient

        client = MlflowClient(ctx.mlflow_uri)
        name = tune.get_context().get_trial_name()
        run_id = client.create_run(ctx.experiment_id, run_name=name,
                                   tags={"mlflow.parentRunId": ctx.parent_run_id, "carryon.trial": name}).info.run_id
        log_params(ctx.mlflow_uri, run_id, {**flatten({k: v for k, v in overrides.items()}), "trial": name})
        reporter = MlflowReporter(ctx.mlflow_uri, run_id)
    trainer = Trainer(cfg, calib, RunPlan.of(cfg, ctx.n_train), head_w, head_b, reporter)

    def cached(name: str) -> list[EncodedBatch]:
        items = ray.get(ctx.cache.items_for.remote(0, 1, name))
        return [calib.select(get_batch(item)) for item in items]

    train = cached("train")
    val = trainer.eval_set(cached("val"))
    general = trainer.eval_set(cached("general")) if "general" in ctx.sets else None
    status = "FINISHED"

    def report(metrics: dict, stats) -> None:  # an epoch per Tune report, with the recipe's state
        report_state(tune, trainer, {**metrics, "mlflow_run_id": run_id or ""})

    try:
        trainer.fit(cached_epochs(train, cfg.train.seed, first_streamed=False), val, general, after_epoch=report)
    except BaseException:
        status = "KILLED"  # stopped early by the scheduler, or failed: recorded as such in MLflow
        raise
    finally:
        if run_id:
            from mlflow.tracking import MlflowClient

            MlflowClient(ctx.mlflow_uri).set_terminated(run_id, status)


@dataclass(frozen=True)
class TrialResult:
    """One trial as the search saw it (from Tune's result and its last report)."""

    overrides: dict  # the sampled config fields (dotted keys)
    val_loss: float | None  # at its chosen alpha, after its last epoch (None: it reported nothing)
    epochs: int  # epochs it ran (fewer than the most when ASHA stopped it)
    alpha: float | None
    error: str | None  # the first 300 characters of its error, when it failed
    mlflow_run_id: str | None  # its MLflow child run


@dataclass
class SearchResult:
    cfg: CarryOnConfig  # the best trial's config
    state: dict  # its last checkpoint's recipe state
    trials: list[TrialResult]
    best: TrialResult
    stopped_early: int  # trials ASHA stopped before the most epochs
    failed: int

    def summary(self) -> dict:
        """The search's entry in the run summary (JSON-able)."""
        return {"trials": [asdict(t) for t in self.trials], "best": asdict(self.best),
                "stopped_early": self.stopped_early, "failed": self.failed}


def search(cfg: CarryOnConfig, ctx: SearchContext, storage_path: str, name: str) -> SearchResult:
    """Run the trials; the best one's config and state (raises if every trial failed)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    t = cfg.tune
    r = cfg.resources
    resources = {"CPU": r.train_cpus, r.training_resource: 1} | ({"GPU": r.train_gpus} if r.train_gpus else {})
    epochs = t.space.get("train.epochs", [cfg.train.epochs])
    max_epochs = cfg.carryon.stages * int(max(epochs) if isinstance(epochs, list) else epochs["max"])
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=max_epochs, grace_period=t.grace_epochs,
                               reduction_factor=t.reduction_factor)
                 if t.scheduler == "asha" else FIFOScheduler())
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), resources)
    tuner = tune.Tuner(
        trainable,
        param_space=search_space(cfg),
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", num_samples=t.trials, scheduler=scheduler,
                                    # the same samples of the space on every run (train.seed)
                                    search_alg=BasicVariantGenerator(random_state=cfg.train.seed),
                                    max_concurrent_trials=t.max_concurrent, time_budget_s=t.time_budget_s),
        run_config=tune.RunConfig(name=name, storage_path=storage_path, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    t0 = time.perf_counter()
    grid = tuner.fit()
    trials = []
    for res in grid:
        m = res.metrics or {}
        trials.append(TrialResult(dict(res.config or {}), m.get("val_loss"), m.get("training_iteration", 0),
                                  m.get("alpha"), str(res.error)[:300] if res.error else None,
                                  m.get("mlflow_run_id") or None))
    done = [(tr, res) for tr, res in zip(trials, grid) if res.error is None and res.checkpoint is not None
            and tr.val_loss is not None]
    failed = [tr for tr in trials if tr.error]
    for tr in failed:
        log.warning("tune trial %s failed: %s", tr.overrides, tr.error)
    if not done:
        raise RuntimeError(f"every tune trial failed ({len(failed)} errors); first: {failed[0].error if failed else '?'}")
    best_trial, best_res = min(done, key=lambda p: p[0].val_loss)
    state = load_state(best_res.checkpoint)
    early = sum(1 for tr in trials if not tr.error and tr.epochs < max_epochs)
    log.info("tune: %d trials (%d stopped early, %d failed) in %.0fs; best %s: val loss %.4f at alpha %s",
             len(trials), early, len(failed), time.perf_counter() - t0, best_trial.overrides, best_trial.val_loss,
             best_trial.alpha)
    return SearchResult(trial_config(ctx.cfg, best_trial.overrides), state, trials, best_trial, early, len(failed))
