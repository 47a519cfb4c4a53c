"""One customization run, written once; a backend says where its steps run.

    data       the run's rows by its RowPlan (carryon_ray/data.py): split, replay pick, order, packing;
               rows read, kept and skipped per source; the padding share of the training batches
    calibrate  the bridge, fitted on the first training rows by the base
    fit        embed every row once through the base and fit the carry-on with `Trainer.fit`
               (alpha chosen on validation data each epoch); the backend returns the trainer's state
    save       the adapter (safetensors + JSON) from that state, the held-out comparison of base and
               base + adapter, summary.json; `finish` adds what the edges record (MLflow's run and
               registered version)

`customize(cfg, backend)` is that story. A backend supplies only the places: `InProcess` below
(lists in this process: `carryon train`, one machine) and `RayBackend` in jobs/backend.py (Ray
Data over an actor pool for the base forward, TorchTrainer or a Tune search for the epochs, remote
tasks on inference-class nodes). Reporting, the summary and the adapter are the same in both by
construction; tests/test_job.py runs both on one config and compares them.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from .config import CarryOnConfig
from .data import DataReport, RowPlan, load_splits, padding_share
from .embedding import Calibration
from .progress import Progress, quiet
from .recipe import NullReporter, Reporter, RunPlan, Trainer, cached_epochs

log = logging.getLogger("carryon.train")


@dataclass
class RunData:
    """What a backend's data step hands the story: counts and reports (small), the calibration batch
    (the first training rows), and the backend's own handle on the rows (lists, or Ray datasets)."""

    reports: dict[str, DataReport]
    profiles: dict[str, tuple[str, list[dict], str]]  # dataset name -> (source, per-row profile, context)
    n_train: int  # training sequences (after packing)
    n_custom: int  # customization examples (before packing)
    n_replay: int
    padding: tuple[float, float]  # padding share of the training batches: as trained, unpacked
    calibration_rows: list[dict]
    rows: object = None


@dataclass
class Fitted:
    """What a backend's fit step returns: the config and calibration it trained with (a Tune search
    picks its best trial's), the run plan, the Trainer's final state, and the backend's own summary
    entries (cache, search)."""

    cfg: CarryOnConfig
    calibration: Calibration
    plan: RunPlan
    state: dict
    extra: dict = field(default_factory=dict)


class Backend(Protocol):
    """Where the steps of `customize` run."""

    def data(self, reporter: Reporter) -> RunData: ...

    def calibrate(self, data: RunData) -> Calibration: ...

    def fit(self, data: RunData, calib: Calibration, reporter: Reporter) -> Fitted: ...

    def heldout(self, cfg: CarryOnConfig, adapter_dir: Path) -> dict | None:
        """carryon_ray.evaluation.score_heldout's result for the saved adapter (None when not configured)."""


def customize(cfg: CarryOnConfig, backend: Backend, reporter: Reporter | None = None,
              finish: Callable[[CarryOnConfig, dict], dict] | None = None) -> dict:
    """Run one customization on `backend`; writes the adapter and summary.json to cfg.output.dir and
    returns the summary. `finish(trained_cfg, summary)` runs once the adapter is saved and its
    entries join the summary (the MLflow model and registry: carryon_mlflow.tracking.registration)."""
    reporter = reporter or NullReporter()
    t_start = time.perf_counter()
    stages = Stopwatch()  # seconds per step of the story: where a run's wall went (summary.json)
    # -- data -----------------------------------------------------------------------------------
    data = backend.data(reporter)
    report_data(data.reports, data.profiles, data.n_custom, data.n_replay, reporter)
    report_padding(*data.padding, data.n_train, reporter)
    stages.lap("data")
    # -- calibrate ------------------------------------------------------------------------------
    calib = backend.calibrate(data)
    reporter.params({"bridge_bytes_per_token": f"{calib.bytes_per_token():.1f}"})
    stages.lap("calibrate")
    # -- fit ------------------------------------------------------------------------------------
    fitted = backend.fit(data, calib, reporter)
    trainer = Trainer(fitted.cfg, fitted.calibration, fitted.plan)
    trainer.load_state_dict(fitted.state)
    stages.lap("fit")
    # -- save -----------------------------------------------------------------------------------
    out = Path(cfg.output.dir).resolve()
    data_summary = [r.summary() for r in data.reports.values()]
    adapter = trainer.save(out, cfg.base.name, {"data": data_summary})
    stages.lap("save")
    heldout = report_heldout(backend.heldout(fitted.cfg, adapter), cfg, reporter)
    stages.lap("heldout")
    summary = {**trainer.summary(), "data": data_summary, "train_sequences": data.n_train, "adapter": str(adapter),
               "heldout": heldout, **fitted.extra, "wall_seconds": round(time.perf_counter() - t_start, 1),
               "stage_seconds": stages.laps}
    if finish is not None:
        summary.update(finish(fitted.cfg, summary))
        stages.lap("finish")  # the dict in the summary is the stopwatch's own: it gains this entry
    write_summary(out, summary)
    log.info("validation loss %.4f -> %.4f at alpha %.4g; adapter saved to %s", summary["val_loss_before"],
             summary["val_loss_after"], summary["alpha"], adapter)
    return summary


class Stopwatch:
    """Seconds between successive `lap(name)` calls, in order (a stage's time includes its reporting)."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._t, 1)
        self._t = now


# ---------------------------------------------------------------------------------------------
# What every run reports, whichever backend ran it.
# ---------------------------------------------------------------------------------------------


def report_heldout(result: dict | None, cfg: CarryOnConfig, reporter: Reporter) -> dict | None:
    """The held-out comparison as metrics, a printed side-by-side table, and the summary's `heldout` entry."""
    if result is None:
        return None
    from .evaluation import side_by_side

    reporter.metrics({"heldout_accuracy_base": result["base_accuracy"],
                      "heldout_accuracy_adapter": result["adapter_accuracy"], "heldout_rows": result["rows"]}, 0)
    print("\n" + side_by_side(result, cfg.eval.show), flush=True)
    return {k: result[k] for k in ("rows", "base_accuracy", "adapter_accuracy", "scored_on") if k in result} | {
        "examples": result["records"][: max(cfg.eval.show, 20)]}


def report_padding(now: float, unpacked: float, sequences: int, reporter: Reporter) -> None:
    """The padding share of the training batches as trained and as they would be unpacked."""
    log.debug("padding share of the training batches: %.1f %% (%.1f %% unpacked; %d sequences)", 100 * now,
             100 * unpacked, sequences)
    reporter.metrics({"padding_share": now, "padding_share_unpacked": unpacked, "train_sequences": sequences}, 0)


def report_data(reports: dict, profiles: dict[str, tuple[str, list[dict], str]], n_custom: int, n_replay: int,
                reporter: Reporter) -> None:
    """Rows read, kept and skipped per data source (in the log and as metrics); each source as a
    dataset input of the run (its path or built-in name and a per-row token profile of its first rows)."""
    for role, rep in reports.items():
        log.info("data (%s) %s", role, rep.summary())
        reporter.metrics(rep.metrics(f"data_{role}"), 0)
    if n_replay:
        log.info("replay: %d general-domain sequences mixed into %d customization sequences", n_replay, n_custom)
        reporter.metrics({"replay_sequences": n_replay}, 0)
    for name, (source, profile, context) in profiles.items():
        reporter.dataset(name, source, profile, context)


def write_summary(out_dir: str | Path, summary: dict) -> Path:
    """summary.json next to the adapter (the per-step train losses stay out of it)."""
    path = Path(out_dir) / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: v for k, v in summary.items() if k != "train_losses"}, indent=2, default=str))
    return path


# ---------------------------------------------------------------------------------------------
# The in-process backend: `carryon train`, one machine, no cluster.
# ---------------------------------------------------------------------------------------------


def split_profiles(splits, cfg: CarryOnConfig, rows: int = 1000) -> dict[str, tuple[str, list[dict], str]]:
    """The dataset inputs of an in-process run (the Ray backend builds the same from its datasets)."""
    from .loss import IGNORE

    def profile(examples):
        return [{"tokens": len(e.input_ids), "scored_tokens": sum(lab != IGNORE for lab in e.labels)}
                for e in examples[:rows]]

    d = cfg.data
    out = {"train": (str(d.train), profile(splits.train), "training"),
           "val": (str(d.val or f"{d.train} (validation split)"), profile(splits.val), "validation")}
    if splits.general:
        out["general"] = (str(d.general_val), profile(splits.general), "evaluation")
    if splits.replay:
        out["replay"] = (str(d.replay), profile(splits.replay), "training")
    return out


def embed_token_rows(bases: list, calib: Calibration, rows: list[dict], batch: int, progress: Progress = quiet,
                     what: str = "rows") -> dict:
    """Embedding rows (bridge codes, one per token row, in order): the base forward in `batch`
    groups through `embed_rows`, the embedding actors' own function."""
    from .embedding import columns, concat_rows, embed_rows

    bridges = calib.bridges()
    starts = range(0, len(rows), batch)
    return concat_rows([embed_rows(bases, bridges, columns(rows[i : i + batch]), calib.shallow, tap=calib.tap)
                        for i in progress(starts, f"base forward ({what})", len(starts))])


def encoded_batches(calib: Calibration, rows: dict, batch_size: int) -> list:
    """Consecutive groups of `batch_size` embedding rows as EncodedBatches (what a trainer consumes)."""
    from .embedding import from_rows, part_layout, row_batches

    layout = part_layout(calib.bridges(), calib.dims, calib.base_dtype)
    return [from_rows(g, layout) for g in row_batches(rows, batch_size)]


class RemoteProducers(Protocol):
    """Producers that already hold the base elsewhere (actors/client.py: Producers.running, the
    serving replicas or the cluster's shared service): the in-process backend embeds through them
    instead of loading the base itself."""

    kind: str

    def calibrate(self, data: RunData) -> Calibration | None: ...

    def embed_rows(self, calib: Calibration, rows: list[dict], progress: Progress, what: str) -> dict: ...

    def score_heldout(self, cfg_json: dict, files: dict[str, bytes]) -> dict | None: ...


class FitElsewhere(Protocol):
    """The epochs of an in-process run somewhere else, on the rows it embedded (jobs/trainers.py:
    `fit_embedded` on the cluster's trainer service, for a fine-tuning API job): `sets` holds the
    "train", "val" (and "general") embedding rows in order; `after_epoch(trainer, metrics)` gets
    each epoch's state. Returns the Trainer's final state."""

    def __call__(self, cfg: CarryOnConfig, calib: Calibration, plan: RunPlan, sets: dict[str, dict],
                 after_epoch: Callable[[Trainer, dict], None] | None) -> dict: ...


class InProcess:
    """Every step in this process: the rows are lists, the base forward runs here in
    embed_batch_size groups (`embed_rows`, the embedding actors' function), the epochs run on
    batches held in memory. Given `producers`, the base forward runs on them instead and this
    process loads only the tokenizer (and the output head for an inherited head): a fine-tuning
    job beside the serving replicas holds no second copy of the base."""

    def __init__(self, cfg: CarryOnConfig, progress: Progress = quiet,
                 after_epoch: Callable[[Trainer, dict], None] | None = None,
                 producers: RemoteProducers | None = None, fit_on: FitElsewhere | None = None):
        self.cfg, self.progress = cfg, progress
        self.after_epoch = after_epoch  # e.g. the fine-tuning API's per-epoch checkpoint
        self.producers = producers
        self.fit_on = fit_on  # the epochs elsewhere (the cluster's trainer service), else here
        self._bases: list = []

    @property
    def bases(self) -> list:
        """The base(s) in this process, loaded on first use (never, when producers embed)."""
        from .base import FrozenBase

        if not self._bases:
            self._bases = [FrozenBase.load(b) for b in [self.cfg.base, *self.cfg.extra_bases]]
            base = self._bases[0]
            log.info("base %s: %d layers, hidden %d, vocab %d", self.cfg.base.name, base.num_layers,
                     base.hidden_size, base.vocab_size)
        return self._bases

    def data(self, reporter: Reporter) -> RunData:
        from .base import load_tokenizer
        from .embedding import calibration_rows, training_rows

        cfg = self.cfg
        if self.producers is not None:
            tokenizer = load_tokenizer(cfg.base)
            log.info("base forward on the %s producers; this process loads only the tokenizer", self.producers.kind)
        else:
            tokenizer = self.bases[0].tokenizer
        splits = load_splits(tokenizer, cfg.data, seed=cfg.train.seed)
        rows = training_rows(splits, cfg)
        plan, bs = RowPlan(cfg.data, cfg.train.seed), cfg.train.batch_size
        unpacked = sorted([*splits.train, *(splits.replay or [])], key=lambda e: plan.order(e.key))  # training order
        padding = (padding_share([len(r["input_ids"]) for r in rows], bs),
                   padding_share([len(e.input_ids) for e in unpacked], bs))
        return RunData(splits.reports, split_profiles(splits, cfg), len(rows), len(splits.train),
                       len(splits.replay or []), padding, rows[: calibration_rows(cfg)], (splits, rows))

    def calibrate(self, data: RunData) -> Calibration:
        from .embedding import calibrate

        cfg = self.cfg
        if self.producers is not None:
            calib = self.producers.calibrate(data)
            if calib is not None:
                return calib
        return calibrate(self.bases, cfg.bridge, cfg.layers.shallow, data.calibration_rows, cfg.tap_spec())

    def _embedded(self, calib: Calibration, rows: list[dict], what: str) -> dict:
        """Embedding rows (columns) of token rows, in order: on the producers, else here."""
        if self.producers is not None:
            return self.producers.embed_rows(calib, rows, self.progress, what)
        return embed_token_rows(self.bases, calib, rows, self.cfg.resources.embed_batch_size, self.progress, what)

    def _head(self):
        from .base import load_head

        if self.cfg.head.kind != "inherited":
            return None, None
        if self.producers is not None:
            return load_head(self.cfg.base)  # the head's tensors only, from the checkpoint files
        return self.bases[0].head_weight, self.bases[0].head_bias

    def fit(self, data: RunData, calib: Calibration, reporter: Reporter) -> Fitted:
        from .embedding import token_rows

        cfg = self.cfg
        splits, rows = data.rows
        t0 = time.perf_counter()
        sets = {"train": self._embedded(calib, rows, "training rows")}
        log.info("embedded %d training rows in %.1fs (bridge %d bits, %.0f bytes/token)", len(rows),
                 time.perf_counter() - t0, cfg.bridge.bits, calib.bytes_per_token())
        sets["val"] = self._embedded(calib, token_rows(splits.val), "validation")
        if splits.general:
            sets["general"] = self._embedded(calib, token_rows(splits.general), "general-domain set")
        plan = RunPlan.of(cfg, len(rows))
        extra = {"producers": self.producers.kind} if self.producers is not None else {}
        if self.fit_on is not None:
            state = self.fit_on(cfg, calib, plan, sets, self.after_epoch)
            return Fitted(cfg, calib, plan, state, {**extra, "trainers": "service"})
        head_w, head_b = self._head()
        trainer = Trainer(cfg, calib, plan, head_w, head_b, reporter)
        bs = cfg.train.batch_size  # each set's columns dropped once they are batches (one copy held)
        train = encoded_batches(calib, sets.pop("train"), bs)
        val = trainer.eval_set(encoded_batches(calib, sets.pop("val"), bs))
        general = trainer.eval_set(encoded_batches(calib, sets.pop("general"), bs)) if "general" in sets else None
        epochs = cached_epochs(train, cfg.train.seed)

        def shown(epoch: int):
            feed = epochs(epoch)
            feed.batches = self.progress(feed.batches, f"epoch {epoch + 1}/{plan.epochs}", len(train))
            return feed

        hook = self.after_epoch
        trainer.fit(shown, val, general, after_epoch=(lambda metrics, _stats: hook(trainer, metrics)) if hook else None)
        return Fitted(cfg, calib, plan, trainer.state_dict(), extra)

    def heldout(self, cfg: CarryOnConfig, adapter_dir: Path) -> dict | None:
        from .evaluation import score_heldout

        if not cfg.eval.heldout:
            return None
        if self.producers is not None:
            files = {p.name: p.read_bytes() for p in Path(adapter_dir).iterdir() if p.is_file()}
            out = self.producers.score_heldout(cfg.model_dump(mode="json"), files)
            if out is not None:
                return {**out, "scored_on": f"{self.producers.kind} producer"}
        out = score_heldout(self.bases, adapter_dir, cfg)
        return None if out is None else {**out, "scored_on": "in process"}


def fit_in_process(cfg: CarryOnConfig, reporter: Reporter | None = None, progress: Progress = quiet,
                   finish: Callable[[CarryOnConfig, dict], dict] | None = None) -> dict:
    """`customize` on the in-process backend (what `carryon train` runs)."""
    return customize(cfg, InProcess(cfg, progress), reporter, finish)
