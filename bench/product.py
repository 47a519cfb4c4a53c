"""The product's own fitting path for the quality benchmarks (quality.py, replay_kl.py).

A figure in docs/benchmarks.md is a figure of the product: rows become token rows, the base runs
through `embed_rows` (the embedding actors' function, bridge included), the codes come back as
`EncodedBatch`es (`from_rows`), the customization and replay rows are merged in training order by
the run's RowPlan (`training_rows`), and the carry-on is fitted by `Trainer.fit`, which chooses
alpha on validation data, guarded by the general-domain set when replay is on.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from carryon_ray.config import CarryOnConfig, DataConfig
from carryon_ray.data import DataReport, RowPlan, Splits, load_examples, read_rows
from carryon_ray.embedding import (ROW_ID, Calibration, calibrate, calibration_rows, concat_rows, token_rows,
                                   training_rows)
from carryon_ray.pipeline import embed_token_rows, encoded_batches
from carryon_ray.recipe import RunPlan, Trainer, cached_epochs


class Cached:
    """Every set of a benchmark embedded once through the product's embedding function (bridge
    codes; every layer in `taps`), ready to be batched for any configuration, as the job's
    embedding cache serves every epoch and every Tune trial."""

    def __init__(self, base, cfg: CarryOnConfig, taps: list[int], sets: dict[str, list], replay: str = "replay"):
        self.calib = calibrated(base, cfg, taps, sets["train"])
        self.sets, self.rows, self.seconds = sets, {}, {}
        for name, exs in sets.items():
            self.rows[name], self.seconds[name] = embedded(base, self.calib, token_rows(exs, replay=name == replay),
                                                           what=name)
        mixable = concat_rows([self.rows["train"], *([self.rows[replay]] if replay in sets else [])])
        self._pool = mixable
        self._index = {int(sid): i for i, sid in enumerate(mixable[ROW_ID])}  # sample id -> row
        self.replay = replay

    def training(self, cfg: CarryOnConfig, keep: Calibration | None = None) -> list:
        """The training batches of `cfg`: customization rows, and replay rows when cfg.data.replay
        is set, in the RowPlan's training order, batch_size rows each."""
        order = mixed_rows(cfg, self.sets["train"], self.sets.get(self.replay) if cfg.data.replay else None)
        idx = np.array([self._index[r[ROW_ID]] for r in order])
        return batches(self.calib, {k: v[idx] for k, v in self._pool.items()}, cfg.train.batch_size, keep)

    def eval(self, name: str, keep: Calibration | None = None, batch_size: int = 16) -> list:
        return batches(self.calib, self.rows[name], batch_size, keep)


def ordered(examples, seed: int = 0) -> list:
    """Examples in the RowPlan's training order (what LoRA baselines train on, batch after batch)."""
    plan = RowPlan(DataConfig(train="bench"), seed)
    return sorted(examples, key=lambda e: plan.order(e.key))


def calibrated(base, cfg: CarryOnConfig, taps: list[int], examples) -> Calibration:
    """The bridge of `cfg` fitted on the first training rows, embedding every layer in `taps`
    (configurations reading fewer layers take `Calibration.subset`, as a Tune trial does)."""
    rows = token_rows(examples[: calibration_rows(cfg)])
    return calibrate([base], cfg.bridge, taps, rows, cfg.tap_spec())


def show_progress() -> None:
    """The product's progress lines in a benchmark's output, as `carryon train` shows them: the base
    forward (rows/s, ETA), training (from the first step, with an ETA) and the alpha evaluations.
    A full-size run is tens of minutes of work that otherwise prints nothing between its results."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


def embedded(base, calib: Calibration, rows: list[dict], batch: int = 16, what: str = "rows") -> tuple[dict, float]:
    """Embedding rows (bridge codes) of token rows, and the seconds the base forward took."""
    from carryon_cli.core import bar  # a bar on a terminal, a line every ~30 s in a log

    t0 = time.perf_counter()
    out = embed_token_rows([base], calib, rows, batch, progress=bar, what=what)
    return out, time.perf_counter() - t0


def batches(calib: Calibration, rows: dict, batch_size: int, keep: Calibration | None = None) -> list:
    """EncodedBatches of embedding rows in order; `keep` (a subset of `calib`) drops the sources it does not read."""
    out = encoded_batches(calib, rows, batch_size)
    return [keep.select(b) for b in out] if keep is not None else out


def mixed_rows(cfg: CarryOnConfig, train, replay=None) -> list[dict]:
    """Token rows of the customization (and replay) examples in the run's training order."""
    return training_rows(Splits(train, [], None, {}, replay), cfg)


def fit(cfg: CarryOnConfig, calib: Calibration, train: list, val: list, general: list | None, steps: int,
        head_weight=None, head_bias=None) -> tuple[Trainer, dict, float]:
    """`Trainer.fit` for `steps` optimizer steps over the cached batches (epochs in the product's
    order, alpha chosen after each); returns the trainer, its last epoch's metrics and its training
    seconds (alpha selection excluded)."""
    plan = RunPlan(len(train), -(-steps // len(train)), max_steps=steps)
    trainer = Trainer(cfg, calib, plan, head_weight, head_bias)
    val_d = trainer.eval_set(val)
    general_d = trainer.eval_set(general) if general else None
    seconds = []
    trainer.fit(cached_epochs(train, cfg.train.seed, first_streamed=False), val_d, general_d,
                after_epoch=lambda metrics, stats: seconds.append(stats.seconds))
    return trainer, trainer.last_metrics, sum(seconds)


# ---------------------------------------------------------------------------------------------
# The GSM8K / WikiText-2 protocol both quality benchmarks share.
# ---------------------------------------------------------------------------------------------


def add_protocol_args(p, root) -> None:
    """The arguments of the shared protocol (data, sizes, steps, exact match, the LoRA baseline)."""
    p.add_argument("--gsm8k", default=str(root.parent / "shared/data/gsm8k/train.jsonl"))
    p.add_argument("--wikitext", default=str(root.parent / "shared/data/wikitext2/valid.txt"))
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--replay-rows", type=int, default=500)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--replay-per-batch", type=int, default=4)
    p.add_argument("--kl-weight", type=float, default=1.0)
    p.add_argument("--em-n", type=int, default=48, help="held-out questions for exact match (0: skip)")
    p.add_argument("--em-tokens", type=int, default=192, help="new tokens per exact-match answer")
    p.add_argument("--em-batch", type=int, default=16)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-lr", type=float, default=1e-3)


def protocol_data(args, tok):
    """(GSM8K train, GSM8K validation, WikiText-2 windows, held-out exact-match rows). Sets
    args.template. GSM8K rows longer than 256 tokens are skipped, so twice the rows are read; the
    held-out questions are the rows after every row training and validation could have read."""
    import sys

    qa = DataConfig(train=args.gsm8k, format="qa", max_length=256)
    read = 2 * (args.n_train + args.n_val)
    gsm, rep = load_examples(args.gsm8k, tok, qa, limit=read)
    print(f"GSM8K: {rep.summary()}", flush=True)
    args.template = qa.prompt_template
    em_rows = read_rows(args.gsm8k, DataReport(args.gsm8k), limit=read + args.em_n)[read:] if args.em_n else []
    if args.em_n and len(em_rows) < args.em_n:
        sys.exit(f"--em-n {args.em_n}: only {len(em_rows)} rows of {args.gsm8k} are left after the first {read}")
    text = DataConfig(train=args.wikitext, format="text", loss_on_prompt=True, max_length=128)
    wiki, _ = load_examples(args.wikitext, tok, text)
    wiki = [e for e in wiki if len(e.input_ids) >= 32]  # headings and blank-ish lines carry little
    return gsm[: args.n_train], gsm[args.n_train : args.n_train + args.n_val], wiki, em_rows
