"""MLflow tracking for customization runs: one run per customization, params, stepped metrics,
figures, the adapter as an artifact, and registration in the model registry under an alias.

Both runners use it the same way: `Tracker.start` opens the run, a `MlflowReporter` (the
recipe's Reporter) receives the recipe's metrics from wherever the recipe runs (this process or
a Ray Train worker), and `finish_run` logs the figures and the adapter from the run's summary.
Nothing is read back from MLflow: results travel with the run.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
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


# MLflow's chart view groups metrics by the part of their name before a '/': the recipe's names
# (the core knows no MLflow) get their section here, once, for every runner. First match wins.
SECTIONS = [
    ("train/", ("train_loss_step", "train_loss", "train_kl", "train_tokens", "lr", "epoch", "stage", "step", "samples",
                "from_cache", "replay_rows")),
    ("val/", ("val_loss_base", "val_loss_alpha_", "val_loss", "val_general_alpha_", "general_loss_change",
              "gate_mean_")),
    ("alpha/", ("alpha_stage_", "alpha", "sweep_val_", "sweep_general_")),
    ("heldout/", ("heldout_",)),
    ("data/", ("data_", "padding_share", "train_sequences", "replay_sequences")),
    ("moe/", ("expert_",)),
    ("system/", ("peak_rss_mb", "epoch_seconds", "first_batch_wait_s", "input_wait_fraction", "producer_tokens_per_s",
                 "train_tokens_per_s", "tokens_embedded", "eta_s", "wall_seconds")),
]
_STRIP = ("heldout_", "data_", "val_", "train_")  # the section already says it (sweep_* keeps its name)


def metric_name(name: str) -> str:
    """The MLflow name of one of the recipe's metrics: 'val_loss' -> 'val/loss', 'alpha' -> 'alpha/chosen',
    'data_train_kept' -> 'data/train_kept', 'peak_rss_mb' -> 'system/peak_rss_mb'; names outside the
    recipe's (a probe's) stay as they are."""
    for section, prefixes in SECTIONS:
        for prefix in prefixes:
            if name == prefix or (prefix.endswith("_") and name.startswith(prefix)):
                if name == "alpha":
                    return "alpha/chosen"
                short = name
                if section in ("val/", "train/", "heldout/", "data/") and short.startswith(_STRIP):
                    short = short.split("_", 1)[1]
                elif section == "alpha/" and short.startswith("alpha_"):
                    short = short.removeprefix("alpha_")
                return section + short
    return name


def log_metrics(uri: str | None, run_id: str | None, metrics: dict[str, float], step: int) -> None:
    """Log a batch of metrics to an existing run (from any process), under their MLflow section names."""
    if not uri or not run_id:
        return
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    items = [Metric(metric_name(k), float(v), now, step) for k, v in metrics.items()
             if v is not None and v == v]  # drop NaN
    for i in range(0, len(items), 900):  # MLflow takes up to 1000 metrics per batch
        MlflowClient(uri).log_batch(run_id, metrics=items[i : i + 900])


def log_params(uri: str | None, run_id: str | None, params: dict[str, object]) -> None:
    """Log string params to an existing run (from any process)."""
    if not uri or not run_id:
        return
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    items = [Param(k, str(v)[:5000]) for k, v in params.items()]
    for i in range(0, len(items), 90):  # MLflow accepts up to 100 params per batch
        MlflowClient(uri).log_batch(run_id, params=items[i : i + 90])


class MlflowReporter:
    """The recipe's Reporter, writing to one MLflow run; picklable (a URI and a run id), so a Ray
    Train worker can hold one."""

    def __init__(self, uri: str | None, run_id: str | None):
        self.uri, self.run_id = uri, run_id

    def metrics(self, values: dict[str, float], step: int) -> None:
        log_metrics(self.uri, self.run_id, values, step)

    def params(self, values: dict[str, object]) -> None:
        log_params(self.uri, self.run_id, values)

    def dataset(self, name: str, source: str, profile: list[dict], context: str) -> None:
        if not self.uri or not self.run_id:
            return
        from mlflow.tracking import MlflowClient

        from .flavor import dataset_input

        MlflowClient(self.uri).log_inputs(self.run_id, datasets=[dataset_input(name, source, profile, context)])


# MLflow 3's UI opens an experiment by its kind: untagged it guesses GenAI (traces, "No data");
# this kind opens on the training runs.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def experiment_id(client, name: str) -> str:
    """The id of experiment `name`, created if missing, tagged as a model-training experiment."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, tags=dict([EXPERIMENT_KIND]))
    if exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    return exp.experiment_id


def run_name(cfg) -> str:
    """A run name that says what ran: the registered name (or experiment) and the carry-on's kind and
    size, e.g. 'demo-topics mlp64', 'gsm8k-recycled recycled-k8-r8'."""
    a = cfg.carryon
    shape = f"recycled-k{a.depth}-r{a.rank}" if a.kind == "recycled" else f"{a.kind}{a.width}"
    if a.kind == "transformer":
        shape += f"x{a.layers}"
    return f"{cfg.mlflow.register_as or cfg.mlflow.experiment} {shape}"


class Tracker:
    """One MLflow run; every method is a no-op when no tracking URI is set."""

    def __init__(self, uri: str | None, experiment: str, run_name: str | None = None):
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.client = None
        if uri:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(uri)

    @classmethod
    def for_config(cls, cfg) -> "Tracker":
        return cls(tracking_uri(cfg.mlflow.tracking_uri), cfg.mlflow.experiment, cfg.mlflow.run_name or run_name(cfg))

    def attach(self, run_id: str, params: dict[str, Any]) -> str:
        """Log into an existing run (the fine-tuning API's job record is its run): the config as
        params and config.yaml, as `start` does."""
        self.run_id = run_id
        self.experiment_id = self.client.get_run(run_id).info.experiment_id
        self.client.update_run(run_id, status="RUNNING")
        log_params(self.uri, self.run_id, flatten(params))
        import yaml

        self.text(yaml.safe_dump(params, sort_keys=False), "config.yaml")
        return run_id

    def start(self, params: dict[str, Any], tags: dict[str, str] | None = None) -> str | None:
        """Open the run (creating the experiment as a training-runs experiment), log the config as
        params and as config.yaml."""
        if not self.client:
            log.info("MLflow tracking off (set mlflow.tracking_uri or MLFLOW_TRACKING_URI)")
            return None
        self.experiment_id = experiment_id(self.client, self.experiment)
        run = self.client.create_run(self.experiment_id, run_name=self.run_name, tags=tags or {})
        self.run_id = run.info.run_id
        log_params(self.uri, self.run_id, flatten(params))
        import yaml

        self.text(yaml.safe_dump(params, sort_keys=False), "config.yaml")
        page = (f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
                if self.uri.startswith(("http://", "https://")) else self.uri)
        log.info("MLflow run %s in experiment %r: %s", self.run_id, self.experiment, page)
        return self.run_id

    @property
    def reporter(self) -> MlflowReporter:
        return MlflowReporter(self.uri, self.run_id)

    def metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        log_metrics(self.uri, self.run_id, metrics, step)

    def param(self, key: str, value: Any) -> None:
        log_params(self.uri, self.run_id, {key: value})

    def text(self, text: str, name: str) -> None:
        if self.client and self.run_id:
            self.client.log_text(self.run_id, text, name)

    def figure(self, fig, name: str) -> None:
        if self.client and self.run_id:
            self.client.log_figure(self.run_id, fig, name)

    def artifacts(self, local_dir: str, artifact_path: str) -> None:
        if self.client and self.run_id:
            self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def log_model(self, local_dir: str, name: str, params: dict[str, str] | None = None) -> str | None:
        """Log an MLflow model directory as a logged model of this run (MLflow 3 lists it under the
        run's "Logged models"); returns its model id."""
        if not (self.client and self.run_id):
            return None
        model = self.client.create_logged_model(self.experiment_id, name=name, source_run_id=self.run_id,
                                                params=params, model_type="carryon-adapter")
        self.client.log_model_artifacts(model.model_id, local_dir)
        self.client.finalize_logged_model(model.model_id, "READY")
        from mlflow.entities import LoggedModelOutput

        self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, 0)])  # the run page lists it
        return model.model_id

    def register(self, name: str, alias: str, model_id: str, tags: dict[str, str] | None = None) -> int | None:
        """Register a logged model as a new version (linked to it and to the run) and point `alias` at it.

        `tags` go on the registered model (serving reads carryon.owner / carryon.shared)."""
        if not (self.client and self.run_id):
            return None
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException:
            pass  # already registered
        # MLflow logs "Waiting up to 300 seconds ..." at INFO for every version it waits on; the
        # line this method logs below says the same thing, once it is true.
        logging.getLogger("mlflow.store.model_registry.abstract_store").setLevel(logging.WARNING)
        mv = self.client.create_model_version(name, source=f"models:/{model_id}", run_id=self.run_id, model_id=model_id)
        self.client.set_registered_model_alias(name, alias, mv.version)
        for key, value in (tags or {}).items():
            self.client.set_registered_model_tag(name, key, value)
        log.info("registered %s version %s (alias %r): load with models:/%s@%s", name, mv.version, alias, name, alias)
        return int(mv.version)

    def end(self, status: str) -> None:
        if self.client and self.run_id:
            self.client.set_terminated(self.run_id, status)


def plot_figures(tracker: Tracker, cfg, summary: dict) -> None:
    """The loss curve and the alpha trade-off figure, from the run's summary."""
    if not (tracker.client and tracker.run_id):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = summary.get("train_losses") or []
    val = [(h["step"], h["val_loss"]) for h in summary.get("history", [])]
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
    final = summary.get("last_epoch") or {}
    sweep = sorted(cfg.alpha.general_sweep)
    if all(f"sweep_general_{a:g}" in final for a in sweep):
        alpha = summary["alpha"]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(sweep, [final[f"sweep_val_{a:g}"] for a in sweep], "o-", label="customization validation loss")
        ax.plot(sweep, [final[f"sweep_general_{a:g}"] for a in sweep], "s-", label="general-domain loss")
        ax.axvline(alpha, color="grey", ls="--", label=f"chosen alpha {alpha:g}")
        chosen = final.get(f"val_general_alpha_{alpha:g}")
        if chosen is not None:  # the operating point the (guarded) search picked
            ax.plot([alpha], [chosen], "r*", ms=14, label="chosen point (general loss)")
        if cfg.alpha.general_guard is not None and "val_general_alpha_0" in final:
            ax.axhline(final["val_general_alpha_0"] + cfg.alpha.general_guard, color="red", ls=":",
                       label=f"guard: base + {cfg.alpha.general_guard:g}")
        ax.set_xlabel("alpha")
        ax.set_ylabel("cross entropy")
        ax.legend()
        tracker.figure(fig, "figures/alpha_tradeoff.png")
        plt.close(fig)


def heldout_table(tracker: Tracker, heldout: dict | None) -> None:
    """The held-out comparison (prompt, expected, base, adapter) as an MLflow table beside the figures."""
    rows = (heldout or {}).get("examples") or []
    if not (rows and tracker.client and tracker.run_id):
        return
    cols = ("prompt", "expected", "base", "adapter", "base_correct", "adapter_correct")
    tracker.client.log_table(tracker.run_id, {c: [r.get(c) for r in rows] for c in cols}, "heldout.json")


def finish_run(tracker: Tracker, cfg, summary: dict, adapter_dir: str) -> int | None:
    """Figures, held-out accuracies, the adapter as an MLflow model (pyfunc flavor, the adapter its
    artifact), registration of that model (with the serving tags), wall time. Returns the
    registered version (None when not registering or tracking is off)."""
    if not (tracker.client and tracker.run_id):
        return None
    import tempfile

    from .flavor import save_pyfunc

    plot_figures(tracker, cfg, summary)
    heldout_table(tracker, summary.get("heldout"))
    with tempfile.TemporaryDirectory() as d:
        shape = {k: str(v) for k, v in cfg.carryon.used_fields().items()}
        model_id = tracker.log_model(str(save_pyfunc(adapter_dir, f"{d}/model")), "adapter", shape)
    version = None
    if cfg.mlflow.register_as:
        tags = {"carryon.shared": str(cfg.mlflow.shared).lower(), "carryon.base": cfg.base.name}
        if cfg.mlflow.owner:
            tags["carryon.owner"] = cfg.mlflow.owner
        version = tracker.register(cfg.mlflow.register_as, cfg.mlflow.alias, model_id, tags)
    if summary.get("wall_seconds") is not None:
        tracker.metrics({"wall_seconds": summary["wall_seconds"]})
    return version


@contextmanager
def tracked_run(cfg, tags: dict[str, str] | None = None):
    """One MLflow run around a customization: opened with the config, ended FINISHED, or FAILED
    when anything inside raises (the exception goes on). Every runner uses it the same way:

        with tracked_run(cfg, tags) as tracker:
            customize(cfg, backend, tracker.reporter, registration(tracker))"""
    tracker = Tracker.for_config(cfg)
    tracker.start(cfg.model_dump(mode="json"), tags={"carryon.base": cfg.base.name, **(tags or {})})
    try:
        yield tracker
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")


def registration(tracker: Tracker):
    """The pipeline's `finish` step for a tracked run: figures, the adapter as an MLflow model, its
    registered version (carryon_ray.pipeline.customize merges these entries into the summary)."""
    def finish(cfg, summary: dict) -> dict:
        return {"run_id": tracker.run_id, "model_version": finish_run(tracker, cfg, summary, summary["adapter"])}

    return finish
