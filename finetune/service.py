"""The fine-tuning API's logic on the gateway: every route's checks and answers, with nothing in
the gateway's memory (records in the Store, jobs in detached actors). Synchronous (MLflow's client
is): the gateway calls it in a thread. Errors are ApiError(status, message, param, code); any check
that can fail runs before anything is written, so a refused request leaves nothing half-created."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

from .files import PURPOSES, FileRejected, check_file
from .jobs import (ACTIVE, ApiError, TERMINAL, checkpoint_name, effective_hyperparameters, file_object, job_config,
                   job_object, model_name, new_seed, page, parse_model_name, parse_request)
from .runner import NAMESPACE, FinetuneJob, actor_name
from .store import JOBS_EXPERIMENT, Store, run_id_of

log = logging.getLogger("carryon.finetune")
KILL_WAIT_S = 10  # how long a cancel waits for a queued job's process to be gone
LOST_AFTER_S = 120  # an active job whose actor is gone this long after creation failed with its process
RETRY_AFTER_S = 30


def not_found(what: str, obj_id: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"no {what} {obj_id!r} for this key", param, f"{what.replace(' ', '_')}_not_found")


def serve_app() -> str | None:
    """The Serve application this gateway runs in (its model replicas embed for the jobs), or None
    outside Serve."""
    try:
        from ray import serve

        return serve.get_replica_context().app_name
    except Exception:  # noqa: BLE001 - not in a Serve replica
        return None


class FinetuneService:
    def __init__(self, cfg):
        uri = cfg.finetune_tracking_uri
        if not uri:
            raise ValueError("finetune: no MLflow tracking URI (set finetune.tracking_uri or registry.tracking_uri, "
                             "or finetune.enabled: false)")
        self.cfg, self.ft = cfg, cfg.finetune
        self.store = Store(uri)
        self.mlflow_url = uri if uri.startswith("http") else None
        # (user, name) -> (source, mux id) of models that resolved: a succeeded job and its checkpoints
        # never change, so a hit skips the store on every later request (misses are never kept).
        self._resolved: OrderedDict[tuple[str, str], tuple[str, str]] = OrderedDict()
        self._lock = threading.Lock()

    # -- files ------------------------------------------------------------------------------------
    def upload(self, user: str, filename: str, purpose: str, content: bytes) -> dict:
        if purpose not in PURPOSES:
            raise ApiError(400, f"purpose: {purpose!r} is not supported here (use fine-tune)", "purpose")
        if not filename or len(filename) > 255 or "/" in filename or "\\" in filename:
            raise ApiError(400, "file: give a file name of up to 255 characters (no directories)", "file")
        if len(content) > self.ft.max_file_bytes:
            raise ApiError(413, f"file: over {self.ft.max_file_bytes} bytes (finetune.max_file_bytes)", "file",
                           "file_too_large")
        try:
            check = check_file(content, self.ft.max_file_rows, self.ft.max_bad_fraction)
        except FileRejected as exc:
            raise ApiError(exc.status, exc.message, "file", exc.code) from None
        return file_object(self.store.create_file(user, filename, purpose, content, check.info()))

    def _file(self, user: str, file_id: str, param: str | None = None) -> dict:
        rec = self.store.get_file(file_id, user)
        if rec is None:
            raise not_found("file", file_id, param)
        return rec

    def get_file(self, user: str, file_id: str) -> dict:
        return file_object(self._file(user, file_id))

    def list_files(self, user: str, purpose: str | None, after: str | None, limit: int, order: str) -> dict:
        items = [file_object(r) for r in self.store.list_files(user) if purpose is None or r["purpose"] == purpose]
        if order == "asc":
            items.reverse()
        return page(items, after, limit)

    def file_content(self, user: str, file_id: str) -> bytes:
        self._file(user, file_id)
        return self.store.file_content(file_id)

    def delete_file(self, user: str, file_id: str) -> dict:
        self._file(user, file_id)
        self.store.delete_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # -- jobs -------------------------------------------------------------------------------------
    def create_job(self, user: str, body: dict) -> dict:
        req = parse_request(body)
        if req.model != self.cfg.model_id:
            raise ApiError(400, f"model: {req.model!r} is not a base this server fine-tunes (available: "
                           f"{self.cfg.model_id})", "model", "model_not_available")
        files = {}
        for param in ("training_file", "validation_file"):
            fid = getattr(req, param)
            if fid is None:
                continue
            rec = self.store.get_file(fid, user)
            if rec is None:
                raise ApiError(400, f"{param}: no file {fid!r} for this key", param, "invalid_file")
            if rec["purpose"] != "fine-tune":
                raise ApiError(400, f"{param}: file {fid!r} has purpose {rec['purpose']!r}; upload it with purpose "
                               "fine-tune", param, "invalid_file")
            files[param] = rec
        active = [j for j in self.store.list_jobs(user) if j.get("status") in ACTIVE]
        if len(active) >= self.ft.max_active_jobs_per_user:
            raise ApiError(429, f"this user already has {len(active)} active fine-tuning jobs (limit "
                           f"{self.ft.max_active_jobs_per_user}); retry when one ends", None, "rate_limit_exceeded")
        seed = req.seed if req.seed is not None else new_seed()
        train_info = files["training_file"]["info"]
        cfg = job_config(req, self.ft.defaults, self.cfg.base.model_dump(), seed, "train.jsonl",
                         "val.jsonl" if req.validation_file else None, "out", None, JOBS_EXPERIMENT, "check",
                         user)
        if train_info["rows"] > self.ft.max_job_rows:
            raise ApiError(400, f"training_file: {train_info['rows']} rows; jobs through this API take at most "
                           f"{self.ft.max_job_rows} (finetune.max_job_rows): run larger ones with `carryon customize`",
                           "training_file", "invalid_training_file")
        bad = train_info["bad_rows"] / max(1, train_info["rows"])
        if bad > cfg.data.max_bad_fraction:
            lines = "; ".join(f"line {ln}: {why}" for ln, why in train_info["bad_lines"][:5])
            raise ApiError(400, f"training_file: {train_info['bad_rows']} of {train_info['rows']} rows cannot train "
                           f"(over data.max_bad_fraction = {cfg.data.max_bad_fraction}): {lines}", "training_file",
                           "invalid_training_file")
        fields = {"status": "validating_files", "model": req.model, "training_file": req.training_file,
                  "validation_file": req.validation_file, "suffix": req.suffix, "seed": seed,
                  "hyperparameters": effective_hyperparameters(cfg, self.ft.defaults), "settings": req.carryon,
                  "request": req.model_dump(mode="json", exclude_none=True)}
        job_id = self.store.create_job(user, fields, req.metadata or {}, f"ft {user} {req.suffix or ''}".strip())
        name = model_name(self.cfg.model_id, user, req.suffix, job_id)
        self.store.update_job(job_id, fine_tuned_model_pending=name, registered_name=job_id)
        self.store.add_event(job_id, f"Created fine-tuning job: {job_id}")
        self.store.add_event(job_id, f"Validated training file: {req.training_file} ({train_info['rows']} rows"
                             + (f", {train_info['bad_rows']} will be skipped" if train_info["bad_rows"] else "") + ")")
        try:
            self._launch(job_id)
        except Exception as exc:  # noqa: BLE001 - the record says why; the caller gets it as a failed job
            log.exception("could not start fine-tuning job %s", job_id)
            self.store.update_job(job_id, status="failed", finished_at=int(time.time()), error={
                "code": "server_error", "message": f"the job could not be started: {type(exc).__name__}",
                "param": None})
        return self.get_job(user, job_id)

    def _launch(self, job_id: str) -> None:
        ft, r = self.ft, self.cfg.replicas
        resources = {r.resource: ft.job_resource_units} if ft.job_resource_units > 0 else {}
        actor = FinetuneJob.options(name=actor_name(job_id), namespace=NAMESPACE, lifetime="detached",
                                    num_cpus=ft.job_cpus, num_gpus=ft.job_gpus, resources=resources).remote()
        self.store.update_job(job_id, status="queued")
        self.store.add_event(job_id, "Job queued: waiting for a place on an inference-class node")
        actor.run.remote(job_id, {"tracking_uri": self.store.uri, "base": self.cfg.base.model_dump(mode="json"),
                                  "defaults": self.ft.defaults, "coserve_app": serve_app(),
                                  "producers": self.ft.producers})

    def _job(self, user: str, job_id: str) -> dict:
        rec = self.store.get_job(job_id, user)
        if rec is None:
            raise not_found("fine-tuning job", job_id, "fine_tuning_job_id")
        return self._reap(rec)

    def _reap(self, rec: dict) -> dict:
        """An active job whose process is gone (its node died) is failed, with the reason, once."""
        if rec.get("status") not in ACTIVE or time.time() - rec["created_at"] < LOST_AFTER_S:
            return rec
        import ray

        try:
            ray.get_actor(actor_name(rec["id"]), namespace=NAMESPACE)
            return rec
        except ValueError:
            pass
        fresh = self.store.get_job(rec["id"])
        if fresh.get("status") in ACTIVE:  # it may have finished while we looked
            self.store.update_job(rec["id"], status="failed", finished_at=int(time.time()), error={
                "code": "job_lost", "message": "the job's process ended without finishing it (its node was lost?); "
                "create the job again", "param": None})
            self.store.add_event(rec["id"], "The job's process was lost", level="error")
            fresh = self.store.get_job(rec["id"])
        return fresh

    def get_job(self, user: str, job_id: str) -> dict:
        return job_object(self._job(user, job_id), self.mlflow_url)

    def list_jobs(self, user: str, after: str | None, limit: int, metadata: dict[str, str] | None = None) -> dict:
        recs = self.store.list_jobs(user)
        if metadata:
            recs = [r for r in recs if all((r.get("metadata") or {}).get(k) == v for k, v in metadata.items())]
        return page([job_object(self._reap(r), self.mlflow_url) for r in recs], after, limit)

    def cancel(self, user: str, job_id: str) -> dict:
        rec = self._job(user, job_id)
        if rec.get("status") in TERMINAL:
            raise ApiError(400, f"the job is already {rec['status']}; only a job that is validating files, queued or "
                           "running can be cancelled", "fine_tuning_job_id", "invalid_job_state")
        if not rec["cancel_requested"]:
            self.store.request_cancel(job_id)
            self.store.add_event(job_id, "Cancellation requested: the job stops at its next step")
        if rec.get("status") in ("validating_files", "queued"):  # not started: nothing to stop at a step
            self._cancel_unstarted(job_id)
        return self.get_job(user, job_id)

    def _cancel_unstarted(self, job_id: str) -> None:
        """A queued job's process is ended, and once it is gone the record says `cancelled`. The
        process may have started between our read and the kill and written `running`: nobody will
        write after it, so any active status is ours to end (without the wait, such a job was
        later reaped as lost, `failed`)."""
        import ray

        try:
            ray.kill(ray.get_actor(actor_name(job_id), namespace=NAMESPACE), no_restart=True)
        except ValueError:
            pass
        deadline = time.time() + KILL_WAIT_S  # ray.kill only asks: wait until the name is released
        while time.time() < deadline:
            try:
                ray.get_actor(actor_name(job_id), namespace=NAMESPACE)
            except ValueError:
                break
            time.sleep(0.2)
        fresh = self.store.get_job(job_id)
        if fresh.get("status") in ACTIVE:
            self.store.update_job(job_id, status="cancelled", finished_at=int(time.time()), estimated_finish=None)
            self.store.add_event(job_id, "The job was cancelled before it started")

    def events(self, user: str, job_id: str, after: str | None, limit: int) -> dict:
        from carryon_mlflow.tracking import metric_name

        rec = self._job(user, job_id)
        out = [{"object": "fine_tuning.job.event", "id": f"ftevent-{rec['run_id'][:8]}-{key}",
                "created_at": e["created_at"], "level": e["level"], "message": e["message"], "data": e.get("data"),
                "type": "message", "_order": key} for key, e in rec["events"]]
        losses = self.store.metric_history(job_id, metric_name("train_loss_step"))
        total = (rec.get("progress") or {}).get("total_steps")
        val = {m.step: m.value for m in self.store.metric_history(job_id, metric_name("val_loss"))}
        alpha = {m.step: m.value for m in self.store.metric_history(job_id, metric_name("alpha"))}
        for m in losses:
            data = {"step": m.step, "train_loss": m.value, "total_steps": total}
            msg = f"Step {m.step}" + (f"/{total}" if total else "") + f": training loss={m.value:.4f}"
            if m.step in val:
                data.update({"valid_loss": val[m.step], "full_valid_loss": val[m.step], "alpha": alpha.get(m.step)})
                msg += f", validation loss={val[m.step]:.4f}, alpha={alpha.get(m.step, float('nan')):g}"
            out.append({"object": "fine_tuning.job.event", "id": f"ftevent-{rec['run_id'][:8]}-m{m.step:09d}",
                        "created_at": m.timestamp // 1000, "level": "info", "message": msg, "data": data,
                        "type": "metrics", "_order": f"{m.timestamp * 1_000_000:020d}-m"})
        out.sort(key=lambda e: e.pop("_order"), reverse=True)
        return page(out, after, limit)

    def checkpoints(self, user: str, job_id: str, after: str | None, limit: int) -> dict:
        rec = self._job(user, job_id)
        name = rec.get("fine_tuned_model") or rec.get("fine_tuned_model_pending")
        items = [{"object": "fine_tuning.job.checkpoint", "id": f"ftckpt-{rec['run_id']}-{c['step_number']}",
                  "created_at": c["created_at"], "fine_tuning_job_id": job_id, "step_number": c["step_number"],
                  "metrics": c["metrics"], "fine_tuned_model_checkpoint": checkpoint_name(name, c["step_number"])}
                 for c in reversed(rec["checkpoints"])]
        return page(items, after, limit)

    # -- serving ------------------------------------------------------------------------------------
    def resolve(self, user: str, name: str) -> tuple[str, str] | None:
        """(source, multiplexing id) of a fine-tuned model or checkpoint `user` may call; None when it
        does not exist, is not theirs, or has not finished (the same answer for each)."""
        with self._lock:
            hit = self._resolved.get((user, name))
            if hit is not None:
                self._resolved.move_to_end((user, name))
                return hit
        found = self._lookup(user, name)
        if found is not None:
            with self._lock:
                self._resolved[(user, name)] = found
                while len(self._resolved) > 4096:
                    self._resolved.popitem(last=False)
        return found

    def _lookup(self, user: str, name: str) -> tuple[str, str] | None:
        parsed = parse_model_name(name)
        if parsed is None:
            return None
        job_id, step = parsed
        if run_id_of(job_id, "ftjob-") is None:
            return None
        rec = self.store.get_job(job_id, user)
        if rec is None:
            return None
        final = rec.get("fine_tuned_model") or rec.get("fine_tuned_model_pending")
        if step is None:
            if rec.get("status") != "succeeded" or name != rec.get("fine_tuned_model"):
                return None
            return rec["source"], job_id
        if name != checkpoint_name(final, step) or step not in [c["step_number"] for c in rec["checkpoints"]]:
            return None
        return f"runs:/{rec['run_id']}/checkpoints/step-{step}", f"{job_id}-step-{step}"

    def models(self, user: str) -> list[str]:
        return [r["fine_tuned_model"] for r in self.store.list_jobs(user)
                if r.get("status") == "succeeded" and r.get("fine_tuned_model")]
