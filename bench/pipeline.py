"""Producer throughput and pipeline overlap (issue 5, items 1 and 2).

1. Producer throughput: tokens/s of what an embedding actor runs per batch (`EmbeddingProducer`:
   base forward, hidden-state extraction, 8-bit bridge, per-sample rows for the object store) vs
   a plain Hugging Face forward of the same model, dtype and batch (`model(input_ids,
   attention_mask)`, logits included, as a user would call it), in this process, alternating.
2. Pipeline overlap: one customization epoch of `jobs.customize` on a local Ray cluster (one
   embedding actor, one Train worker, 1 CPU each: this machine has 2) vs each stage alone in this
   process with 1 thread (the actor's and the worker's share): the producer over every training
   row, and the carry-on steps over the decoded batches. The in-process sequential baseline is
   their sum. Target: the epoch at most 1.15x the slower stage alone.

Writes bench/results/pipeline.json. Run: python bench/pipeline.py [--rows 160 --reps 3].
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CARRYON_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from carryon_ray.base import FrozenBase  # noqa: E402
from carryon_ray.config import validate_config  # noqa: E402
from carryon_ray.data import batches, load_splits  # noqa: E402
from carryon_ray.embedding import calibrate, decode_sources, from_rows, part_layout, token_rows  # noqa: E402
from carryon_ray.train import build_carryon, make_optimizer, train_step  # noqa: E402


def config(args, out_dir: str):
    return validate_config({
        "base": {"name": "smollm2-135m-instruct", "dtype": "float32"},
        "carryon": {"kind": "mlp", "width": 64},
        "train": {"epochs": 1, "batch_size": 8, "warmup_steps": 2},
        "data": {"train": args.data, "format": "qa" if args.data.endswith(".jsonl") else "auto",
                 "num_samples": args.rows, "val_fraction": 0.1, "max_length": 256, "builtin_size": args.rows},
        "bridge": {"bits": 8},
        "resources": {"embed_actors_min": 1, "embed_actors_max": 1, "embed_batch_size": 8, "train_workers_min": 1,
                      "train_workers_max": 1, "cache": "memory"},
        "output": {"dir": out_dir},
    })


def rows_of(examples):
    rows = token_rows(examples)
    return {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}


def calibrated_producer(cfg, base, splits):
    """(a producer's embed of one request, bridges, dims): what the actor runs, bridge fitted on 16 training rows."""
    from carryon_ray.producer import Producer, Request

    calib = calibrate([base], cfg.bridge, [], token_rows(splits.train[:16]))
    core = Producer([cfg.base.model_dump()])
    core.add_job("bench", calib)
    producer = lambda batch: core.embed([Request("bench", batch)])[0]  # noqa: E731 - what the actor runs per request
    return producer, calib.bridges(), calib.dims


def producer_throughput(args, base, splits, producer) -> dict:
    pad = base.tokenizer.pad_token_id
    groups = [splits.train[i : i + 8] for i in range(0, len(splits.train) - 7, 8)]
    plain_s, prod_s, tokens = [], [], sum(len(e.input_ids) for g in groups for e in g)
    for _ in range(args.reps):
        t0 = time.perf_counter()
        for g in groups:
            b = next(batches(g, len(g), pad))
            with torch.inference_mode():
                base.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        plain_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for g in groups:
            producer(rows_of(g))
        prod_s.append(time.perf_counter() - t0)
    plain, prod = tokens / min(plain_s), tokens / min(prod_s)
    return {"tokens": tokens, "batch": 8, "threads": torch.get_num_threads(), "plain_hf_tokens_per_s": plain,
            "producer_tokens_per_s": prod, "ratio": prod / plain, "target": 0.95, "met": prod / plain >= 0.95,
            "producer_seconds": prod_s, "plain_seconds": plain_s}


def stages_alone(cfg, base, splits, producer, bridges, dims) -> dict:
    """Each stage with one thread, as in the actor and the Train worker."""
    torch.set_num_threads(1)
    layout = part_layout(bridges, dims, base.dtype)
    t0 = time.perf_counter()
    produced = [producer(rows_of(splits.train[i : i + 8])) for i in range(0, len(splits.train), 8)]
    embed_s = time.perf_counter() - t0
    decoded = [(decode_sources(bridges, b.enc, dims, base.dtype), b.labels)
               for b in (from_rows(p, layout) for p in produced)]
    model = build_carryon(cfg, [base.hidden_size], base.vocab_size, base.head_weight, base.head_bias)
    opt, sched = make_optimizer(model, cfg, len(decoded))
    t0 = time.perf_counter()
    for sources, labels in decoded:
        train_step(model, opt, sched, sources, labels, cfg.train.loss_chunk, cfg.train.grad_clip)
    train_s = time.perf_counter() - t0
    torch.set_num_threads(os.cpu_count() or 1)
    return {"embed_alone_s": embed_s, "train_alone_s": train_s, "sequential_s": embed_s + train_s,
            "batches": len(decoded)}


def ray_epoch(cfg) -> dict:
    import ray

    from jobs.customize import run

    with tempfile.TemporaryDirectory() as tmp:
        ray.init(num_cpus=2, resources={"inference_node": 100, "training_node": 100}, _temp_dir=os.path.join(tmp, "ray"),
                 include_dashboard=False, runtime_env={"env_vars": {"CARRYON_CACHE": os.environ["CARRYON_CACHE"],
                                                                    "HF_HUB_OFFLINE": "1"}})
        try:
            summary = run(cfg)
        finally:
            ray.shutdown()
    return summary["last_epoch"] | {"job_wall_s": summary["wall_seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/gsm8k/train.jsonl"))
    p.add_argument("--rows", type=int, default=160)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench/results/pipeline.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(args, tmp)
        base = FrozenBase.load(cfg.base)
        splits = load_splits(base.tokenizer, cfg.data, seed=cfg.train.seed)
        producer, bridges, dims = calibrated_producer(cfg, base, splits)
        report = {"config": vars(args), "producer": producer_throughput(args, base, splits, producer)}
        print("producer", json.dumps(report["producer"]), flush=True)
        alone = stages_alone(cfg, base, splits, producer, bridges, dims)
        print("alone", json.dumps(alone), flush=True)
        del base, producer
        epoch = ray_epoch(cfg)
        print("ray", json.dumps(epoch), flush=True)
    slower = max(alone["embed_alone_s"], alone["train_alone_s"])
    report["pipeline"] = {**alone, "ray": epoch, "slower_stage_s": slower,
                          "epoch_over_slower_stage": epoch["epoch_seconds"] / slower,
                          "epoch_minus_first_batch_over_slower_stage":
                              (epoch["epoch_seconds"] - epoch["first_batch_wait_s"]) / slower,
                          "epoch_over_sequential": epoch["epoch_seconds"] / alone["sequential_s"], "target": 1.15}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report["pipeline"], indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
