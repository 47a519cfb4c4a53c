"""Data at cluster scale (issue 16): ingest throughput and the driver's peak memory as the dataset
grows, the job's Ray Data path against the path it replaced; the padding share with and without
example packing on GSM8K.

For each size (synthetic jsonl rows generated on the fly into a temporary file, never committed)
and each path, a fresh Python process (the driver) runs on a fresh local Ray instance and reports
its own peak RSS (ru_maxrss) and wall time:

  driver   (before) the driver reads and tokenizes every row (carryon_ray.data.load_splits), builds
           the training rows in memory and hands them to `ray.data.from_items`;
  ray-data (now)    jobs.data.ingest: Ray Data reads, tokenizes, splits and orders on workers; the
           driver holds datasets, counts and reports.

Target: the ray-data driver's peak memory flat (+5 % at most from the smallest to the largest size),
and ingest faster than the embedding stage (the producer's tokens/s from bench/pipeline.py) so it
never bounds an epoch. Writes bench/results/data.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CARRYON_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def write_rows(path: Path, n: int) -> int:
    """n synthetic prompt/completion rows of varied length; returns the file's bytes."""
    import random

    rng = random.Random(n)
    with path.open("w") as fh:
        for i in range(n):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24)))
            fh.write(json.dumps({"prompt": f"Row {i}: {words}\nLabel:", "completion": f" {rng.choice(WORDS)}"}) + "\n")
    return path.stat().st_size


def driver(path: str, mode: str) -> None:
    """One measurement in this (fresh) process: prints a JSON line."""
    import ray

    from carryon_ray.config import validate_config

    cfg = validate_config({"base": {"name": "smollm2-135m-instruct"},
                           "data": {"train": path, "max_length": 64, "val_fraction": 0.05}})
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"CARRYON_CACHE": os.environ["CARRYON_CACHE"], "HF_HUB_OFFLINE": "1"}})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if mode == "driver":
        from transformers import AutoTokenizer

        from carryon_ray.base import resolve_base_path
        from carryon_ray.data import load_splits
        from carryon_ray.embedding import training_rows

        base_path, _ = resolve_base_path(cfg.base)
        splits = load_splits(AutoTokenizer.from_pretrained(base_path), cfg.data, cfg.train.seed)
        rows = training_rows(splits, cfg)
        ds = ray.data.from_items(rows).materialize()
        n, tokens = ds.count(), sum(len(r["input_ids"]) for r in rows)
    else:
        from jobs.data import ingest

        got = ingest(cfg)
        n, tokens = got.n_train, got.train_tokens
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ray.shutdown()
    print("RESULT " + json.dumps({"mode": mode, "train_sequences": n, "train_tokens": tokens, "wall_s": round(wall, 2),
                                  "driver_peak_rss_mb": round(peak, 1), "driver_rss_before_mb": round(rss0, 1)}))


def padding(data: str, rows: int) -> dict:
    """Padding share of GSM8K training batches (batch 8, max_length 512) with and without packing."""
    from transformers import AutoTokenizer

    from carryon_ray.base import resolve_base_path
    from carryon_ray.config import validate_config
    from carryon_ray.data import load_splits, padding_share
    from carryon_ray.embedding import training_rows

    out = {}
    for pack in (False, True):
        cfg = validate_config({"data": {"train": data, "format": "qa", "num_samples": rows, "max_length": 512,
                                        "pack_examples": pack}})
        tok = AutoTokenizer.from_pretrained(resolve_base_path(cfg.base)[0])
        lengths = [len(r["input_ids"]) for r in training_rows(load_splits(tok, cfg.data), cfg)]
        out["packed" if pack else "unpacked"] = {"sequences": len(lengths), "tokens": sum(lengths),
                                                 "padding_share": round(padding_share(lengths, 8), 4)}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10000,200000,1000000")
    p.add_argument("--modes", default="driver,ray-data")
    p.add_argument("--gsm8k", default=str(ROOT.parent / "shared/data/gsm8k/train.jsonl"))
    p.add_argument("--gsm8k-rows", type=int, default=2000)
    p.add_argument("--producer-tokens-per-s", type=float, default=428.0,
                   help="the embedding stage's throughput to compare with (bench/pipeline.py on this machine)")
    p.add_argument("--out", default=str(ROOT / "bench/results/data.json"))
    p.add_argument("--driver", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.driver:
        driver(*args.driver)
        return 0
    report: dict = {"config": vars(args), "ingest": []}
    with tempfile.TemporaryDirectory() as tmp:
        for n in map(int, args.sizes.split(",")):
            path = Path(tmp) / f"rows-{n}.jsonl"
            size = write_rows(path, n)
            for mode in args.modes.split(","):
                res = subprocess.run([sys.executable, __file__, "--driver", str(path), mode], capture_output=True,
                                     text=True, timeout=3600, cwd=ROOT)
                line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    print(res.stdout[-2000:], res.stderr[-3000:])
                    raise SystemExit(f"{mode} at {n} rows failed")
                r = {"rows": n, "file_mb": round(size / 1e6, 1), **json.loads(line[7:])}
                r["rows_per_s"] = round(n / r["wall_s"], 1)
                r["tokens_per_s"] = round(r["train_tokens"] / r["wall_s"], 1)
                r["over_producer"] = round(r["tokens_per_s"] / args.producer_tokens_per_s, 1)
                report["ingest"].append(r)
                print(json.dumps(r), flush=True)
    for mode in args.modes.split(","):
        runs = [r for r in report["ingest"] if r["mode"] == mode]
        if len(runs) > 1:
            report[f"{mode}_peak_growth"] = round(runs[-1]["driver_peak_rss_mb"] / runs[0]["driver_peak_rss_mb"] - 1, 4)
    if Path(args.gsm8k).is_file():
        report["padding_gsm8k"] = padding(args.gsm8k, args.gsm8k_rows)
        print(json.dumps(report["padding_gsm8k"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
