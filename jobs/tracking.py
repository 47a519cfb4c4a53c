"""MLflow tracking for customization runs: one run per job, params, stepped metrics, figures,
the adapter as an artifact, and registration in the model registry under an alias."""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("carryon.tracking")


def tracking_uri(configured: str | None) -> str | None:
    """The configured URI, else $MLFLOW_TRACKING_URI, else None (tracking off)."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or None


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:5000]
    return out


def log_metrics(uri: str | None, run_id: str | None, metrics: dict[str, float], step: int) -> None:
    """Log a batch of metrics to an existing run (used from Ray Train workers)."""
    if not uri or not run_id:
        return
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v == v]  # drop NaN
    MlflowClient(uri).log_batch(run_id, metrics=items)


def log_params(uri: str | None, run_id: str | None, params: dict[str, object]) -> None:
    """Log string params to an existing run (used from Ray Train workers)."""
    if not uri or not run_id:
        return
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).log_batch(run_id, params=[Param(k, str(v)[:5000]) for k, v in params.items()])


class Tracker:
    """A thin wrapper that is a no-op when no tracking URI is set."""

    def __init__(self, uri: str | None, experiment: str, run_name: str | None = None):
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self.run_id: str | None = None
        self.client = None
        if uri:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(uri)

    def start(self, params: dict[str, Any], tags: dict[str, str] | None = None) -> str | None:
        if not self.client:
            log.info("MLflow tracking off (set mlflow.tracking_uri or MLFLOW_TRACKING_URI)")
            return None
        exp = self.client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
        run = self.client.create_run(exp_id, run_name=self.run_name, tags=tags or {})
        self.run_id = run.info.run_id
        flat = flatten(params)
        keys = list(flat)
        from mlflow.entities import Param

        for i in range(0, len(keys), 90):  # MLflow accepts up to 100 params per batch
            self.client.log_batch(self.run_id, params=[Param(k, flat[k]) for k in keys[i : i + 90]])
        log.info("MLflow run %s in experiment %r at %s", self.run_id, self.experiment, self.uri)
        return self.run_id

    def metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        log_metrics(self.uri, self.run_id, metrics, step)

    def param(self, key: str, value: Any) -> None:
        if self.client and self.run_id:
            self.client.log_param(self.run_id, key, str(value)[:5000])

    def text(self, text: str, name: str) -> None:
        if self.client and self.run_id:
            self.client.log_text(self.run_id, text, name)

    def figure(self, fig, name: str) -> None:
        if self.client and self.run_id:
            self.client.log_figure(self.run_id, fig, name)

    def artifacts(self, local_dir: str, artifact_path: str) -> None:
        if self.client and self.run_id:
            self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def history(self, key: str) -> list[tuple[int, float]]:
        if not (self.client and self.run_id):
            return []
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]

    def register(self, name: str, alias: str, artifact_path: str, tags: dict[str, str] | None = None) -> int | None:
        """Register the run's artifact directory as a new model version and point `alias` at it.

        `tags` go on the registered model (serving reads carryon.owner / carryon.shared)."""
        if not (self.client and self.run_id):
            return None
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException:
            pass  # already registered
        source = f"{self.client.get_run(self.run_id).info.artifact_uri}/{artifact_path}"
        mv = self.client.create_model_version(name, source=source, run_id=self.run_id)
        self.client.set_registered_model_alias(name, alias, mv.version)
        for key, value in (tags or {}).items():
            self.client.set_registered_model_tag(name, key, value)
        log.info("registered %s version %s (alias %r): load with models:/%s@%s", name, mv.version, alias, name, alias)
        return int(mv.version)

    def end(self, status: str) -> None:
        if self.client and self.run_id:
            self.client.set_terminated(self.run_id, status)
