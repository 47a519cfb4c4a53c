"""One fine-tuning job, run where the cluster places it: a detached Ray actor on an inference-class
node that runs the customization story (carryon_ray.pipeline.customize, the one `carryon train`
and `ray job submit ... jobs.customize` run) and writes the job's record as it goes.

    setup     the record (queued -> running), the files downloaded from the store, the config
    fit       customize(cfg, InProcess(...)): the rows embedded once, Trainer.fit; after each epoch
              a checkpoint (the adapter at that epoch's alpha) in the store. The base forward runs
              on the serving replicas of the service's own Serve app (co-serving, between their
              decode steps), else on the cluster's shared producers, else here (one base load);
              the epochs run on the cluster's trainer service when it runs, else here
    save      the adapter logged and registered in MLflow (carryon_mlflow.tracking), then loaded
              from the registry and run for one token before the job says `succeeded`: on a
              serving replica when co-serving (the adapter is then warm there: the model answers
              its first request without a load), else here

The actor is detached: a gateway or model replica that dies mid-job takes nothing with it. It
checks for a cancel request at every optimizer step and every embedding batch, and ends there with
everything it held released (the actor exits). Failures end the record `failed` with an error
{code, message, param} a user can act on.
"""

from __future__ import annotations

import logging
import tempfile
import time
import traceback
from pathlib import Path

import ray

log = logging.getLogger("carryon.finetune")
NAMESPACE = "carryon-finetune"


class JobCancelled(Exception):
    """A cancel request seen at a step boundary."""


def actor_name(job_id: str) -> str:
    return f"job-{job_id}"


class JobWatch:
    """The recipe's Reporter for a job: forwards metrics to the run, checks for a cancel request
    (at most every `check_s`), keeps the record's progress and estimated finish current, and
    emits a message event every `every_steps` steps."""

    def __init__(self, store, job_id: str, inner, check_s: float = 1.0):
        self.store, self.job_id, self.inner, self.check_s = store, job_id, inner, check_s
        self._checked = 0.0
        self._updated = 0.0
        self.trained_tokens = 0
        self.total_steps: int | None = None

    def check(self) -> None:
        now = time.monotonic()
        if now - self._checked >= self.check_s:
            self._checked = now
            if self.store.cancel_requested(self.job_id):
                raise JobCancelled()

    def progress(self, items, desc: str = "", total: int | None = None):
        """A `Progress` that checks for cancellation between embedding batches."""
        for item in items:
            self.check()
            yield item

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.inner.metrics(values, step)
        self.trained_tokens += int(values.get("train_tokens", 0))
        now = time.monotonic()
        if "eta_s" in values and now - self._updated > 5:
            self._updated = now
            self.store.update_job(self.job_id, estimated_finish=int(time.time() + values["eta_s"]),
                                  progress={"step": step, "total_steps": self.total_steps})
        if "train_loss_step" in values:
            self.check()

    def params(self, values: dict[str, object]) -> None:
        self.inner.params(values)

    def dataset(self, name: str, source: str, profile: list[dict], context: str) -> None:
        self.inner.dataset(name, source, profile, context)


def execute(job_id: str, spec: dict) -> str:
    """Run the job to its end; returns the final status. Never raises for a job's own failure.
    `spec` is what the service decides for every job: {tracking_uri, base (the served base's
    config), defaults (finetune.defaults), coserve_app (its Serve application, or None), producers
    (finetune.producers)}."""
    from carryon_mlflow.tracking import Tracker, finish_run
    from carryon_ray.config import ConfigError
    from carryon_ray.data import DataError
    from carryon_ray.pipeline import InProcess, customize

    from .jobs import ApiError, JobCreate, checkpoint_name, job_config
    from .store import JOBS_EXPERIMENT, Store

    import mlflow

    store = Store(spec["tracking_uri"])
    mlflow.set_tracking_uri(store.uri)  # models:/ URIs (the servability check) resolve on this server
    mlflow.set_registry_uri(store.uri)
    rec = store.get_job(job_id)
    if rec is None or rec.get("status") not in ("validating_files", "queued"):
        return rec.get("status") if rec else "missing"
    if rec["cancel_requested"]:
        return finish(store, job_id, "cancelled", "The job was cancelled before it started")
    store.update_job(job_id, status="running", started_at=int(time.time()))
    store.add_event(job_id, "Fine-tuning job started")
    t0 = time.time()
    tracker = None
    try:
        with tempfile.TemporaryDirectory(prefix="carryon-ft-") as tmp:
            train = store.file_path(rec["training_file"], f"{tmp}/train")
            val = store.file_path(rec["validation_file"], f"{tmp}/val") if rec.get("validation_file") else None
            req = JobCreate.model_validate(rec["request"])
            cfg = job_config(req, spec["defaults"], spec["base"], rec["seed"], str(train),
                             str(val) if val else None, f"{tmp}/out", store.uri, JOBS_EXPERIMENT,
                             rec["registered_name"], rec["user"], spec.get("coserve_app"))
            tracker = Tracker(store.uri, JOBS_EXPERIMENT)
            tracker.attach(rec["run_id"], cfg.model_dump(mode="json"))
            watch = JobWatch(store, job_id, tracker.reporter)

            def checkpoint(trainer, metrics: dict) -> None:
                watch.total_steps = trainer.plan.total_steps
                d = Path(tmp) / f"ckpt-{trainer.step}"
                adapter = trainer.save(d, cfg.base.name)
                m = {"step": trainer.step, "train_loss": metrics.get("train_loss"), "valid_loss": metrics.get("val_loss"),
                     "full_valid_loss": metrics.get("val_loss")}
                store.add_checkpoint(job_id, trainer.step, m, str(adapter))
                store.add_event(job_id, f"Checkpoint created at step {trainer.step} (epoch {trainer.epoch}/"
                                f"{trainer.plan.epochs}): validation loss {metrics['val_loss']:.4f} at alpha "
                                f"{metrics['alpha']:g}", data={"step": trainer.step})
                store.update_job(job_id, progress={"step": trainer.step, "total_steps": trainer.plan.total_steps,
                                                   "epoch": trainer.epoch, "epochs": trainer.plan.epochs})

            def register(trained_cfg, summary: dict) -> dict:
                version = finish_run(tracker, trained_cfg, summary, summary["adapter"])
                tracker.client.set_registered_model_tag(rec["registered_name"], "carryon.finetune_job", job_id)
                source = f"models:/{rec['registered_name']}/{version}"
                check_servable(source, producers, backend, job_id)
                return {"model_version": version, "source": source}

            producers = embedding_producers(cfg, job_id, store, spec.get("producers", "auto"))
            backend = InProcess(cfg, watch.progress, after_epoch=checkpoint, producers=producers,
                                fit_on=service_fit(cfg, job_id, store, watch))
            try:
                summary = customize(cfg, backend, watch, register)
            finally:  # succeeded, cancelled or failed: shared producers drop what the job left queued
                if producers is not None:
                    producers.close()
        name = rec["fine_tuned_model_pending"]
        results = store.create_file(rec["user"], "step_metrics.csv", "fine-tune-results", step_metrics_csv(store, job_id),
                                    {"job": job_id})
        store.update_job(job_id, fine_tuned_model=name, source=summary["source"], result_files=[results["id"]],
                         trained_tokens=watch.trained_tokens, result={
                             "val_loss_before": summary["val_loss_before"], "val_loss_after": summary["val_loss_after"],
                             "alpha": summary["alpha"], "steps": summary["steps"], "wall_s": round(time.time() - t0, 1),
                             "checkpoint_models": [checkpoint_name(name, c["step_number"])
                                                   for c in (store.get_job(job_id) or {}).get("checkpoints", [])]})
        tracker.end("FINISHED")
        return finish(store, job_id, "succeeded", f"The job has successfully completed: {name} "
                      f"(validation loss {summary['val_loss_before']:.4f} -> {summary['val_loss_after']:.4f})")
    except JobCancelled:
        if tracker is not None:
            tracker.end("KILLED")
        return finish(store, job_id, "cancelled", "The job was cancelled")
    except (DataError, ConfigError, ApiError) as exc:
        if tracker is not None:
            tracker.end("FAILED")
        param = "training_file" if isinstance(exc, DataError) else "carryon"
        return finish(store, job_id, "failed", f"The job failed: {exc}", error={
            "code": "invalid_training_file" if isinstance(exc, DataError) else "invalid_settings",
            "message": str(exc)[:2000], "param": param})
    except Exception as exc:  # noqa: BLE001 - the record must say the job failed, whatever failed
        log.error("fine-tuning job %s failed:\n%s", job_id, traceback.format_exc())
        if tracker is not None:
            tracker.end("FAILED")
        return finish(store, job_id, "failed", f"The job failed: {type(exc).__name__}: {str(exc)[:500]}", error={
            "code": "server_error", "message": f"{type(exc).__name__}: {str(exc)[:1000]}", "param": None})


def step_metrics_csv(store, job_id: str) -> bytes:
    """OpenAI's results file: one line per step (step, train_loss, train_accuracy, valid_loss,
    valid_mean_token_accuracy); validation at each epoch's last step; accuracies are not measured."""
    from carryon_mlflow.tracking import metric_name

    train = {m.step: m.value for m in store.metric_history(job_id, metric_name("train_loss_step"))}
    val = {m.step: m.value for m in store.metric_history(job_id, metric_name("val_loss"))}
    lines = ["step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"]
    lines += [f"{step},{train[step]:.6f},,{'' if step not in val else f'{val[step]:.6f}'}," for step in sorted(train)]
    return ("\n".join(lines) + "\n").encode()


def finish(store, job_id: str, status: str, message: str, error: dict | None = None) -> str:
    store.update_job(job_id, status=status, finished_at=int(time.time()), error=error, estimated_finish=None)
    store.add_event(job_id, message, level="error" if status == "failed" else "info")
    return status


def embedding_producers(cfg, job_id: str, store, mode: str = "auto"):
    """Where the job's base forward runs (finetune.producers): the producers that already hold the
    base (the serving replicas of the service's app, else the cluster's shared ones), or None (this
    process loads it). Said in the job's events."""
    from actors.client import Producers

    producers = Producers.running(cfg, f"ft-{job_id}") if mode == "auto" else None
    if producers is not None:
        where = {"coserve": f"on the model replicas of Serve app {cfg.resources.coserve_app!r}, between their "
                            "decode steps", "shared": "on the cluster's shared embedding producers"}[producers.kind]
    else:
        why = "finetune.producers is 'job'" if mode == "job" else "no serving replica or shared producer runs this base"
        where = f"in the job's own process ({why})"
    store.add_event(job_id, f"Base forward {where}")
    return producers


def service_fit(cfg, job_id: str, store, watch: JobWatch):
    """The job's epochs on the cluster's trainer service when it runs and can hold them (the rule
    a Ray job follows, resources.trainers: jobs/trainers.py `choose`), else None (this process
    trains). Said in the job's events. On the service, the fit's metrics come back to this job's run and
    checks, each epoch's state becomes the job's checkpoint here, a cancel stops the fit at its
    next batch, and a service that dies resumes the fit from the last checkpoint."""
    from carryon_ray.config import ConfigError
    from jobs.trainers import TRAINERS_NAME, TrainersUnavailable, choose, fit_embedded

    try:
        service, why_not, running = choose(cfg)
    except TrainersUnavailable as exc:  # resources.trainers is 'shared' and the service cannot take it
        raise ConfigError(str(exc)) from None
    if service is None:
        why = f"the trainer service cannot hold this fit: {why_not}" if running else why_not
        store.add_event(job_id, f"Training in the job's own process ({why})")
        return None
    store.add_event(job_id, f"Training on the cluster's trainer service ({TRAINERS_NAME})")

    def fit_on(cfg, calib, plan, sets, after_epoch):
        return fit_embedded(service, cfg, calib, plan, sets, f"ft-{job_id}", after_epoch, watch, watch.check)

    return fit_on


def check_servable(source: str, producers, backend, mux_id: str) -> None:
    """`succeeded` means servable: the registered adapter downloads, loads on the base and decodes.
    Co-serving, a serving replica does it under the model's multiplexing id (`mux_id`), so the
    adapter is already loaded there when its owner's first request comes; else this process does."""
    from carryon_ray.adapter import resolve_adapter
    from carryon_ray.generation import CarryOnModel

    if producers is not None and producers.kind == "coserve":
        from actors.service import replica_call

        if replica_call(producers.cfg.resources.coserve_app, "check_adapter", source, mux_id,
                        what=f"the servability check of job {mux_id}") != 1:
            raise RuntimeError("the registered adapter loaded on a serving replica but did not decode")
        return
    base = backend.bases[0]
    model = CarryOnModel.from_pretrained(base, resolve_adapter(source))
    ids = base.tokenizer("Hello")["input_ids"]
    out = model.generate([ids], 1, stop_at_eos=False)
    if not out or len(out[0]) != 1:
        raise RuntimeError("the registered adapter loaded but did not decode")


@ray.remote(num_cpus=0, max_restarts=0)
class FinetuneJob:
    """The process a job runs in (options at creation: resources, name, detached lifetime)."""

    def run(self, job_id: str, spec: dict) -> str:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        try:
            return execute(job_id, spec)
        finally:
            # A job's process ends with its job: every resource it held is freed. Killed, not asked
            # to exit: a graceful exit waits for the process's threads, and a job that talked to the
            # serving replicas holds a Serve handle whose threads kept the process alive (measured:
            # still alive a minute after its record ended). The record is final by now.
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
            ray.actor.exit_actor()
