"""Durable records of the fine-tuning API, kept in the MLflow tracking server.

Why MLflow: the service already depends on it (the registry it serves adapters from), a platform
team runs it on a SQL database (Postgres, MySQL) with its artifacts in an object store (S3, GCS,
Azure, a volume), and every job becomes a run its UI already shows: params, the loss curves, the
alpha trade-off, the adapter. Ray's job table is the other candidate, but it lives in the head's
GCS (lost with the head unless GCS fault tolerance is set up with Redis), holds no events or files,
and its records cannot be filtered by user. Nothing here lives in a replica's memory: a gateway or
model replica can die at any moment and every file, job, event and checkpoint reads the same after.

    file        a run in experiment `carryon-files`: tags carryon.* (owner, name, purpose, counts),
                the content as the artifact `file.jsonl`; deleting it deletes the run
    job         a run in experiment `carryon-finetune`, the very run the customization logs its
                params, metrics, figures and adapter to; its OpenAI fields are tags carryon.ft.*
    events      message events are tags carryon.event.<ns>-<rand> (one write each, no counter to race
                on); metrics events are read from the run's own metrics (one metrics source)
    checkpoints the adapter after each epoch as artifacts checkpoints/step-<N>/, described by a tag
                carryon.ckpt.<N>

Ids are the run ids with OpenAI's prefixes: `file-<run id>`, `ftjob-<run id>`.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import threading
import time
from pathlib import Path

FILES_EXPERIMENT = "carryon-files"
JOBS_EXPERIMENT = "carryon-finetune"
USER_TAG = "carryon.user"
FIELD = "carryon.ft."
EVENT = "carryon.event."
CKPT = "carryon.ckpt."
META = "carryon.meta."
CANCEL = "carryon.cancel_requested"
CONTENT = "file.jsonl"


def run_id_of(obj_id: str, prefix: str) -> str | None:
    """The run id behind `file-...` / `ftjob-...`, or None when the id is not of that shape."""
    if not obj_id.startswith(prefix):
        return None
    rid = obj_id[len(prefix):]
    return rid if rid.isalnum() and len(rid) <= 64 else None


class Store:
    """Files, jobs, events and checkpoints of the fine-tuning API (thread-safe; one MLflow client)."""

    def __init__(self, tracking_uri: str):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self._experiments: dict[str, str] = {}
        self._lock = threading.Lock()

    def _experiment(self, name: str) -> str:
        with self._lock:
            if name not in self._experiments:
                from carryon_mlflow.tracking import experiment_id

                self._experiments[name] = experiment_id(self.client, name)
            return self._experiments[name]

    def _run(self, run_id: str | None):
        """The live run, or None (missing, deleted, or not a run of ours)."""
        if not run_id:
            return None
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise
        return None if run.info.lifecycle_stage == "deleted" else run

    def _search(self, experiment: str, user: str) -> list:
        out, token = [], None
        while True:
            page = self.client.search_runs([self._experiment(experiment)], f"tags.`{USER_TAG}` = '{user}'",
                                           order_by=["attributes.start_time DESC"], max_results=1000,
                                           page_token=token)
            out += list(page)
            token = page.token
            if not token or len(out) >= 10_000:
                return out

    # -- files ------------------------------------------------------------------------------------
    def create_file(self, user: str, filename: str, purpose: str, content: bytes, info: dict) -> dict:
        tags = {USER_TAG: user, "carryon.filename": filename[:250], "carryon.purpose": purpose,
                "carryon.bytes": str(len(content)), "carryon.info": json.dumps(info)[:7000],
                "mlflow.runName": f"file {filename[:60]}"}
        run = self.client.create_run(self._experiment(FILES_EXPERIMENT), tags=tags)
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / CONTENT).write_bytes(content)
            self.client.log_artifact(run.info.run_id, str(Path(d) / CONTENT))
        self.client.set_terminated(run.info.run_id, "FINISHED")
        return self.file_record(self._run(run.info.run_id))

    @staticmethod
    def file_record(run) -> dict:
        t = run.data.tags
        return {"id": f"file-{run.info.run_id}", "user": t.get(USER_TAG), "filename": t.get("carryon.filename"),
                "purpose": t.get("carryon.purpose"), "bytes": int(t.get("carryon.bytes", 0)),
                "created_at": run.info.start_time // 1000, "info": json.loads(t.get("carryon.info", "{}"))}

    def get_file(self, file_id: str, user: str | None = None) -> dict | None:
        """The file's record; None when it does not exist, was deleted, or is not `user`'s."""
        run = self._run(run_id_of(file_id, "file-"))
        if run is None or run.info.experiment_id != self._experiment(FILES_EXPERIMENT):
            return None
        rec = self.file_record(run)
        return rec if user is None or rec["user"] == user else None

    def list_files(self, user: str) -> list[dict]:
        return [self.file_record(r) for r in self._search(FILES_EXPERIMENT, user)]

    def file_path(self, file_id: str, dst: str) -> Path:
        """The file's content downloaded under `dst` (what a job reads)."""
        return Path(self.client.download_artifacts(run_id_of(file_id, "file-"), CONTENT, dst))

    def file_content(self, file_id: str) -> bytes:
        with tempfile.TemporaryDirectory() as d:
            return self.file_path(file_id, d).read_bytes()

    def delete_file(self, file_id: str) -> None:
        self.client.delete_run(run_id_of(file_id, "file-"))

    # -- jobs -------------------------------------------------------------------------------------
    def create_job(self, user: str, fields: dict, metadata: dict[str, str], run_name: str) -> str:
        """A new job record (its MLflow run); returns the job id."""
        tags = {USER_TAG: user, "mlflow.runName": run_name, **{FIELD + k: json.dumps(v) for k, v in fields.items()},
                **{META + k: v for k, v in metadata.items()}}
        run = self.client.create_run(self._experiment(JOBS_EXPERIMENT), tags=tags)
        return f"ftjob-{run.info.run_id}"

    def update_job(self, job_id: str, **fields) -> None:
        from mlflow.entities import RunTag

        tags = [RunTag(FIELD + k, json.dumps(v)) for k, v in fields.items()]
        self.client.log_batch(run_id_of(job_id, "ftjob-"), tags=tags)

    @staticmethod
    def job_record(run) -> dict:
        t = run.data.tags
        rec = {k[len(FIELD):]: json.loads(v) for k, v in t.items() if k.startswith(FIELD)}
        return {**rec, "id": f"ftjob-{run.info.run_id}", "run_id": run.info.run_id, "user": t.get(USER_TAG),
                "created_at": run.info.start_time // 1000, "mlflow_status": run.info.status,
                "metadata": {k[len(META):]: v for k, v in t.items() if k.startswith(META)} or None,
                "cancel_requested": t.get(CANCEL) == "true",
                "events": sorted((k[len(EVENT):], json.loads(v)) for k, v in t.items() if k.startswith(EVENT)),
                "checkpoints": sorted((json.loads(v) for k, v in t.items() if k.startswith(CKPT)),
                                      key=lambda c: c["step_number"]),
                "experiment_id": run.info.experiment_id}

    def get_job(self, job_id: str, user: str | None = None) -> dict | None:
        """The job's record; None when it does not exist or is not `user`'s."""
        run = self._run(run_id_of(job_id, "ftjob-"))
        if run is None or run.info.experiment_id != self._experiment(JOBS_EXPERIMENT):
            return None
        rec = self.job_record(run)
        return rec if user is None or rec["user"] == user else None

    def list_jobs(self, user: str) -> list[dict]:
        return [self.job_record(r) for r in self._search(JOBS_EXPERIMENT, user)]

    def add_event(self, job_id: str, message: str, level: str = "info", data: dict | None = None) -> None:
        key = f"{EVENT}{time.time_ns():020d}-{secrets.token_hex(3)}"
        value = {"message": message[:2000], "level": level, "created_at": int(time.time()), "data": data}
        self.client.set_tag(run_id_of(job_id, "ftjob-"), key, json.dumps(value))

    def request_cancel(self, job_id: str) -> None:
        self.client.set_tag(run_id_of(job_id, "ftjob-"), CANCEL, "true")

    def cancel_requested(self, job_id: str) -> bool:
        run = self._run(run_id_of(job_id, "ftjob-"))
        return run is not None and run.data.tags.get(CANCEL) == "true"

    def add_checkpoint(self, job_id: str, step: int, metrics: dict, adapter_dir: str) -> dict:
        rid = run_id_of(job_id, "ftjob-")
        self.client.log_artifacts(rid, adapter_dir, f"checkpoints/step-{step}")
        ckpt = {"step_number": step, "metrics": metrics, "created_at": int(time.time())}
        self.client.set_tag(rid, f"{CKPT}{step:09d}", json.dumps(ckpt))
        return ckpt

    def metric_history(self, job_id: str, key: str) -> list:
        return self.client.get_metric_history(run_id_of(job_id, "ftjob-"), key)


def tracking_uri(configured: str | None) -> str | None:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or None
