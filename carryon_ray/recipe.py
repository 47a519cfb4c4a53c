"""The training recipe, written once: what a customization run does after the base has produced
bridge codes, whichever process drives it.

    setup    Trainer(cfg, calibration, plan): the carry-on, its optimizer and schedule, the alpha search
    data     batches arrive as EncodedBatch (bridge codes); the trainer decodes them itself
    loop     Trainer.fit: the base's validation loss, then per epoch begin_epoch (grow a stage when
             the previous one is done), train_on (one train_step per batch: CE on customization
             rows, KL to the base on replay rows, MoE balance), end_epoch (alpha chosen on
             validation data, with the general-domain guard when configured; metrics; history)
    save     summary() and save() write the adapter; state_dict() / load_state_dict() checkpoint it

Every backend runs `Trainer.fit` and supplies only where each epoch's batches come from
(`EpochInput`) and what happens after an epoch: in one process (carryon_ray/pipeline.py), on Ray
Train workers (jobs/train_loop.py: streaming shards, the embedding cache, DDP, checkpoints) and in
Tune trials (jobs/tune.py). Metric names, replay, the guard, stages, MoE, the summary and the
adapter are therefore the same everywhere by construction (tests/test_job.py's parity tests run
the in-process and Ray backends on one config).

A `Reporter` receives metrics and params: MLflow at the edges (carryon_mlflow), nothing here.
"""

from __future__ import annotations

import io
import logging
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

import numpy as np
import torch

from .adapter import save_adapter
from .config import CarryOnConfig
from .embedding import Calibration, EncodedBatch, decode_sources, part_layout
from .progress import AFTER_S, Pace, lines
from .train import (AlphaSearch, build_carryon, evaluate, evaluate_sums, gate_mean, grow_stage, make_optimizer,
                    router_dropout_at, stage_digest, strided_subset, train_step)

log = logging.getLogger("carryon.train")


class Reporter(Protocol):
    """Where a run's numbers go (MLflow, a log, nothing)."""

    def metrics(self, values: dict[str, float], step: int) -> None: ...

    def params(self, values: dict[str, object]) -> None: ...

    def dataset(self, name: str, source: str, profile: list[dict], context: str) -> None:
        """A dataset the run used: its source and a per-row profile (no text)."""


class NullReporter:
    def metrics(self, values: dict[str, float], step: int) -> None:
        pass

    def params(self, values: dict[str, object]) -> None:
        pass

    def dataset(self, name: str, source: str, profile: list[dict], context: str) -> None:
        pass


@dataclass(frozen=True)
class RunPlan:
    """How long a run is: steps per epoch, epochs per stage, stages, an optional step cap."""

    steps_per_epoch: int
    epochs_per_stage: int
    stages: int = 1
    max_steps: int | None = None

    @classmethod
    def of(cls, cfg: CarryOnConfig, n_rows: int, workers: int = 1) -> "RunPlan":
        """The plan for `n_rows` training rows split evenly over `workers` (Ray Data's equal split)."""
        per_worker = n_rows // max(1, workers)
        return cls(max(1, -(-per_worker // cfg.train.batch_size)), cfg.train.epochs, cfg.carryon.stages,
                   cfg.train.max_steps)

    @property
    def steps_per_stage(self) -> int:
        return self.epochs_per_stage * self.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return min(self.max_steps or 1 << 62, self.stages * self.steps_per_stage)

    @property
    def epochs(self) -> int:
        return self.stages * self.epochs_per_stage


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Order of the cached batches in `epoch`: as streamed in epoch 0, a seeded shuffle after."""
    order = list(range(n))
    if epoch > 0:
        random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


@dataclass
class EpochStats:
    """What one pass over training batches measured."""

    sample_ids: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    kls: list[float] = field(default_factory=list)
    tokens: int = 0  # scored (target) tokens
    seen_tokens: int = 0  # every real token the step read (what OpenAI bills as trained tokens)
    replay_rows: int = 0
    wait_s: float = 0.0
    first_wait_s: float = 0.0
    seconds: float = 0.0
    produced_tokens: int = 0
    produced_seconds: float = 0.0
    producer_nodes: set[str] = field(default_factory=set)
    streamed: bool = True


Decoded = list[tuple[list, torch.Tensor]]  # (sources, labels) per batch, for evaluation


@dataclass
class EpochInput:
    """What a backend feeds one epoch: its batches and how they were made.

    `streamed` batches were just embedded (they count toward producer throughput); `on_batch`
    sees each batch before it trains (the Ray runner fills its embedding cache there); `finish`
    runs after the last batch, before validation (barriers, the cache's completion, an audit)."""

    batches: Iterable[EncodedBatch]
    streamed: bool = False
    on_batch: Callable[[int, EncodedBatch], None] | None = None
    finish: Callable[[EpochStats], None] | None = None


def cached_epochs(batches: list[EncodedBatch], seed: int, first_streamed: bool = True) -> Callable[[int], EpochInput]:
    """Epochs over batches held in memory, in `epoch_order`; epoch 0 counts as streamed when the
    batches were embedded for it."""
    return lambda epoch: EpochInput((batches[i] for i in epoch_order(len(batches), seed, epoch)),
                                    streamed=first_streamed and epoch == 0)


def _call(value):
    return value() if callable(value) else value


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def embedded(stats) -> str:
    """The embedding pass so far, for an epoch's progress line: rows, tokens and the producers' rate."""
    rate = (f" at {stats.produced_tokens / stats.produced_seconds:,.0f} tokens/s of producer time"
            if stats.produced_seconds > 0 else "")
    return f", embedded {len(stats.sample_ids)} rows, {stats.produced_tokens:,} tokens{rate}"


class Trainer:
    """One carry-on being fitted: model, optimizer, schedule, alpha search, history."""

    def __init__(self, cfg: CarryOnConfig, calib: Calibration, plan: RunPlan, head_weight=None, head_bias=None,
                 reporter: Reporter | None = None, wrap: Callable | None = None):
        self.cfg, self.calib, self.plan = cfg, calib, plan
        self.bridges, self.dims = calib.bridges(), calib.dims
        self.layout = part_layout(self.bridges, self.dims, calib.base_dtype)
        self.head = (head_weight, head_bias)
        self.reporter = reporter or NullReporter()
        self.wrap = wrap or (lambda m: m)  # DDP on several Ray Train workers
        dist = torch.distributed
        self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0  # seeds its own masks
        self.chunk = cfg.train.loss_chunk
        self.epoch = 0  # the next epoch to run
        self.step = 0
        self.stage_start = 0
        self.val_loss_base: float | None = None
        self.history: list[dict] = []  # one record per finished epoch
        self.train_losses: list[tuple[int, float]] = []  # (step, loss) for the loss curve
        self.last_metrics: dict[str, float] = {}  # the latest end_epoch's metrics
        self.model = build_carryon(cfg, calib.hidden_sizes, calib.vocab_size, head_weight, head_bias, stages=1)
        self._stage_setup()

    def _stage_setup(self) -> None:
        """A fresh optimizer, schedule and alpha search for the current (newest) stage."""
        self.stage_steps = max(1, min(self.plan.steps_per_stage, self.plan.total_steps - self.stage_start))
        self.opt, self.sched = make_optimizer(self.model, self.cfg, self.stage_steps)
        self.search = AlphaSearch.from_config(self.cfg)
        self.ddp = self.wrap(self.model)

    # -- checkpoints ------------------------------------------------------------------------------
    # One format, one file: Ray Train's checkpoints (jobs/train_loop.py) and Tune's trials
    # (jobs/tune.py) both write and read the recipe's state through these two.
    STATE_FILE = "state.pt"

    def save_state(self, directory: str | Path) -> Path:
        """Write the recipe's state into `directory` (a checkpoint's folder)."""
        path = Path(directory) / self.STATE_FILE
        torch.save(self.state_dict(), path)
        return path

    @classmethod
    def read_state(cls, directory: str | Path) -> dict:
        """The state `save_state` wrote (tensors and plain data only: weights_only, nothing unpickled)."""
        return torch.load(Path(directory) / cls.STATE_FILE, weights_only=True)

    def state_bytes(self) -> bytes:
        """The bytes `save_state` writes, built in memory (a checkpoint that travels: jobs/trainers.py)."""
        buf = io.BytesIO()
        torch.save(self.state_dict(), buf)
        return buf.getvalue()

    @classmethod
    def read_state_bytes(cls, blob: bytes) -> dict:
        """The state `state_bytes` gave, read as `read_state` reads the file (weights_only)."""
        return torch.load(io.BytesIO(blob), weights_only=True)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "alpha": self.search.current,
                "alpha_list": list(self.search.candidates_list), "epoch": self.epoch, "step": self.step,
                "stages": len(self.model.stages), "stage_start": self.stage_start,
                "val_loss_base": self.val_loss_base, "history": self.history,
                "train_losses": [list(p) for p in self.train_losses], "last_metrics": dict(self.last_metrics)}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the model is rebuilt with as many stages as the checkpoint had."""
        w, b = self.head
        self.model = build_carryon(self.cfg, self.calib.hidden_sizes, self.calib.vocab_size, w, b,
                                   stages=state["stages"])
        self.stage_start = state["stage_start"]
        self._stage_setup()
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.search.current, self.search.candidates_list = state["alpha"], list(state["alpha_list"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.val_loss_base, self.history = state["val_loss_base"], list(state["history"])
        self.train_losses = [tuple(p) for p in state["train_losses"]]
        self.last_metrics = dict(state["last_metrics"])

    # -- data -------------------------------------------------------------------------------------
    def decode(self, batch: EncodedBatch) -> list[list[torch.Tensor]]:
        return decode_sources(self.bridges, batch.enc, self.dims, self.calib.base_dtype)

    def eval_set(self, batches: Iterable[EncodedBatch]) -> Decoded:
        return [(self.decode(b), b.labels) for b in batches]

    # -- the loop ---------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.epoch >= self.plan.epochs or self.step >= self.plan.total_steps

    @property
    def stage(self) -> int:
        return self.epoch // self.plan.epochs_per_stage

    def _paced(self, items, desc: str, total: int | None):
        """Progress of an evaluation pass in the run's log: nothing for one that ends within
        AFTER_S, else a line with the rate and ETA every train.progress_s and one at its end (the
        recycled kind's three alphas over 200 rows ran minutes without a word)."""
        return lines(items, desc, total, every_s=self.cfg.train.progress_s, logger=log, after_s=AFTER_S)

    @staticmethod
    def _desc(what: str, alphas: list[float]) -> str:
        return f"{what} loss at alpha {', '.join(f'{a:g}' for a in alphas)} (batches)"

    def _evaluate(self, data: Decoded, alphas: list[float], what: str) -> dict[float, float]:
        return evaluate(self.model, data, alphas, self.chunk, progress=self._paced, desc=self._desc(what, alphas))

    def _sums(self, data: Decoded, alphas: list[float], what: str) -> tuple[dict[float, float], int]:
        return evaluate_sums(self.model, data, alphas, self.chunk, progress=self._paced, desc=self._desc(what, alphas))

    def baseline(self, val: Decoded) -> float:
        """Validation loss of the base itself (alpha = 0), before any training."""
        self.val_loss_base = self._evaluate(val, [0.0], "the base's validation")[0.0]
        log.info("validation loss of the base (alpha = 0): %.4f", self.val_loss_base)
        self.reporter.metrics({"val_loss_base": self.val_loss_base}, 0)
        return self.val_loss_base

    def begin_epoch(self) -> int:
        """Grow a new stage when the previous one has had its epochs; returns the stage."""
        stage = self.stage
        if stage >= len(self.model.stages):  # freeze the finished stage and stack a new one on it
            digest = stage_digest(self.model, stage - 1)
            grow_stage(self.model, self.cfg)
            self.stage_start = self.step
            self._stage_setup()
            log.info("stage %d: grown on top of %d frozen stage(s) (stage %d sha256 %s)", stage, stage, stage - 1,
                     digest[:12])
            self.reporter.params({f"stage_{stage - 1}_sha256": digest})
        self.model.expert_usage(reset=True)  # count this epoch's training routes only
        return stage

    def train_on(self, batches: Iterable[EncodedBatch], streamed: bool = True,
                 on_batch: Callable[[int, EncodedBatch], None] | None = None) -> EpochStats:
        """One optimizer step per batch until the batches or the run's step budget end.

        `streamed` batches count toward producer throughput (they were just embedded); `on_batch`
        sees each batch before it trains (the Ray runner fills its embedding cache there)."""
        cfg = self.cfg
        stats = EpochStats(streamed=streamed)
        it, t0 = iter(batches), time.perf_counter()
        pace = Pace(self.plan.total_steps, "steps", every_s=cfg.train.progress_s, start=self.step)
        i = 0
        while self.step < self.plan.total_steps:
            t_wait = time.perf_counter()
            batch = next(it, None)
            if batch is None:
                break
            wait = time.perf_counter() - t_wait
            stats.wait_s += wait
            stats.first_wait_s = wait if i == 0 else stats.first_wait_s
            if on_batch is not None:
                on_batch(i, batch)
            if streamed:
                stats.produced_tokens += batch.produced_tokens
                stats.produced_seconds += batch.produced_seconds
                stats.producer_nodes |= batch.producer_nodes
            router_dropout_at(self.model, self.step - self.stage_start, self.stage_steps,
                              seed=hash((cfg.train.seed, self.step, self.rank)))
            replay = batch.replay if cfg.data.replay else None
            positions, attn_mask = batch.layout()
            out = train_step(self.ddp, self.opt, self.sched, self.decode(batch), batch.labels, self.chunk,
                             cfg.train.grad_clip, replay, cfg.train.kl_weight, cfg.train.kl_top_k,
                             batch.attention_mask, positions, attn_mask)
            self.step += 1
            i += 1
            stats.sample_ids += batch.sample_ids
            stats.losses.append(out.loss)
            stats.kls.append(out.kl)
            stats.tokens += out.tokens
            stats.seen_tokens += int(batch.attention_mask.sum())
            stats.replay_rows += out.replay_rows
            self.train_losses.append((self.step, out.loss))
            self.reporter.metrics({"train_loss_step": out.loss, "lr": self.sched.get_last_lr()[0]}, self.step)
            line = pace.due(self.step)  # the first step, then every ~30 s, with the rate and an ETA
            if line:
                log.info("training: epoch %d, step %s, loss %.4f%s", self.epoch, line, out.loss,
                         embedded(stats) if streamed else "")
            if self.step % 5 == 0:  # metrics for long runs every 5 steps
                el = time.perf_counter() - t0
                eta = el / i * max(0, self.plan.total_steps - self.step)
                self.reporter.metrics({"eta_s": eta, **({"tokens_embedded": stats.produced_tokens} if streamed
                                                        else {})}, self.step)
        stats.seconds = time.perf_counter() - t0
        return stats

    def end_epoch(self, stats: EpochStats, val: Decoded, general: Decoded | None = None) -> dict:
        """Choose alpha on validation data (guarded by the general set when configured), record
        the epoch, report its metrics; returns them."""
        cfg, model = self.cfg, self.model
        stage = self.stage
        usage = model.expert_usage()  # routed slots per expert in this epoch's training
        cands = self.search.candidates()
        # One pass over each set for every alpha this epoch reports: the candidates, the base (for
        # the guard) and the trade-off sweep (each alpha's loss is independent of the others).
        # With alpha.select_rows the candidates (and the sweep) are scored on a strided subset of
        # the validation batches; the chosen alpha then on the rest: val_loss stays the whole set's.
        # The trade-off sweep only after the last epoch: the figure reads the final values, and each
        # sweep alpha is a head pass over both sets (in the demo, 4 more alphas a few seconds each).
        last = self.epoch + 1 >= self.plan.epochs or self.step >= self.plan.total_steps
        sweep = cfg.alpha.general_sweep if general and last else []
        select, rest = strided_subset(val, cfg.alpha.select_rows)
        sums, count = self._sums(select, sorted({*cands, *sweep}), f"epoch {self.epoch}: validation"
                                 + (f" ({len(select)} of {len(val)} batches)" if rest else ""))
        val_all = {a: v / max(count, 1) for a, v in sums.items()}
        val_losses = {a: val_all[a] for a in cands}
        general_all = (self._evaluate(general, sorted({0.0, *cands, *sweep}), f"epoch {self.epoch}: general-domain")
                       if general else None)
        general_losses = {a: general_all[a] for a in sorted({0.0, *cands})} if general else None
        alpha = self.search.choose(val_losses, general_losses, general_losses[0.0] if general_losses else None)
        model.set_alpha(alpha)
        val_loss = val_losses[alpha]
        if rest:
            more, n_more = self._sums(rest, [alpha], f"epoch {self.epoch}: validation, the other batches")
            val_loss = (sums[alpha] + more[alpha]) / max(count + n_more, 1)
        el = max(stats.seconds, 1e-9)
        metrics: dict[str, float] = {
            "epoch": self.epoch, "stage": stage, "step": self.step, "alpha": alpha, f"alpha_stage_{stage}": alpha,
            "val_loss": val_loss,
            "train_loss": float(np.mean(stats.losses)) if stats.losses else float("nan"),
            "train_tokens_per_s": stats.tokens / el, "train_tokens": stats.seen_tokens, "input_wait_fraction": stats.wait_s / el,
            "epoch_seconds": stats.seconds, "first_batch_wait_s": stats.first_wait_s,
            "samples": len(stats.sample_ids), "from_cache": int(not stats.streamed), "peak_rss_mb": peak_rss_mb(),
            **{f"val_loss_alpha_{a:g}": v for a, v in val_losses.items()},
        }
        if general_losses:  # both losses per candidate: the guarded choice is auditable
            metrics.update({f"val_general_alpha_{a:g}": v for a, v in general_losses.items()})
            metrics["general_loss_change"] = general_losses[alpha] - general_losses[0.0]
        for layer, shares in enumerate(usage):
            metrics.update({f"expert_share_l{layer}_e{e}": v for e, v in enumerate(shares)})
            metrics[f"expert_max_share_l{layer}"] = max(shares)
        if cfg.data.replay:
            metrics.update({"replay_rows": stats.replay_rows,
                            "train_kl": float(np.mean(stats.kls)) if stats.kls else 0.0})
        for name, data in (("val", val), ("general", general)):
            g = gate_mean(model, data) if data else None
            if g is not None:
                metrics[f"gate_mean_{name}"] = g
        if stats.streamed and stats.produced_seconds > 0:
            metrics["producer_tokens_per_s"] = stats.produced_tokens / stats.produced_seconds
        if general:  # the customization vs general trade-off curve at the configured alphas
            metrics.update({f"sweep_val_{a:g}": val_all[a] for a in sweep})
            metrics.update({f"sweep_general_{a:g}": general_all[a] for a in sweep})
        shown = {f"{a:g}": round(v, 4) for a, v in val_losses.items()}
        if rest:
            rows = lambda batches: sum(int(y.shape[0]) for _, y in batches)  # noqa: E731
            log.info("epoch %d: val loss on %d of %d rows %s -> alpha %.4g (val loss %.4f on all rows)", self.epoch,
                     rows(select), rows(select) + rows(rest), shown, alpha, val_loss)
        else:
            log.info("epoch %d: val loss %s -> alpha %.4g", self.epoch, shown, alpha)
        self.history.append({"epoch": self.epoch, "stage": stage, "step": self.step, "alpha": alpha,
                             "val_loss": val_loss, "candidates": dict(val_losses),
                             "general": dict(general_losses) if general_losses else None})
        self.reporter.metrics(metrics, self.step)
        self.epoch += 1
        self.last_metrics = metrics
        return metrics

    def fit(self, epochs: Callable[[int], EpochInput], val, general=None,
            after_epoch: Callable[[dict, EpochStats], None] | None = None) -> dict:
        """The epoch loop, the one every backend runs: the base's validation loss first (on a fresh
        run), then per epoch: grow a stage when due, train on `epochs(epoch)`, choose alpha on `val`
        (guarded by `general`), and `after_epoch(metrics, stats)` (checkpoints, Tune reports).
        `val` and `general` may be callables, read when first needed. Returns the summary."""
        if self.epoch == 0:
            self.baseline(_call(val))
        while not self.done:
            self.begin_epoch()
            feed = epochs(self.epoch)
            stats = self.train_on(feed.batches, feed.streamed, feed.on_batch)
            if feed.finish is not None:
                feed.finish(stats)
            metrics = self.end_epoch(stats, _call(val), _call(general))
            if after_epoch is not None:
                after_epoch(metrics, stats)
        return self.summary()

    # -- results ----------------------------------------------------------------------------------
    def summary(self) -> dict:
        """What the run achieved; travels in the checkpoint, so every runner can report it."""
        last = self.history[-1] if self.history else {}
        return {"val_loss_before": self.val_loss_base, "val_loss_after": last.get("val_loss"),
                "alpha": self.model.alpha, "alphas": [float(a) for a in self.model.alphas],
                "stages": len(self.model.stages), "steps": self.step, "epochs": self.epoch,
                "history": self.history, "train_losses": [list(p) for p in self.train_losses],
                "last_epoch": dict(self.last_metrics)}

    def save(self, out_dir: str | Path, base_name: str, extra: dict | None = None) -> Path:
        """Write the adapter (safetensors + JSON) to out_dir/adapter; returns its path."""
        training = {k: v for k, v in self.summary().items() if k != "train_losses"} | (extra or {})
        return save_adapter(Path(out_dir) / "adapter", self.model, self.bridges, self.calib.shallow,
                            self.calib.fingerprints, base_name, training)
