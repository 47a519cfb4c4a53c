"""A shared producer's forwards with and without splitting by length (carryon_ray/producer.py:
`by_length`), on the real base and the demo's real rows, in one process.

What a producer sees when several demo jobs embed at once: each job sends its validation rows, its
general-domain rows (arithmetic word problems, longer) and its training rows (topic sentences,
short) as requests of `resources.embed_batch_size` rows. Jobs start at different times, so job i
is `i / jobs` of the way through its own requests when the run begins (its stream rotated); the
requests go through the producer's fair queue and each forward takes what fits its token budget,
exactly as the producer actor does (actors/embedder.py). Two arms over the same takes:

    one forward   every take runs as one forward per shape (the producer before by_length);
    by length     the take is split where padding costs more than FORWARD_COST_TOKENS.

Arms alternate (--rounds) in one process; the figures are padded tokens, real tokens, seconds and
real tokens/s of each, and their ratios (`by_length_over_one_forward`).

    python bench/producer_lengths.py [--jobs 8] [--rounds 2] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def job_requests(cfg, tokenizer, jobs: int) -> tuple[list[dict], list[list[dict]]]:
    """(the token rows, each job's requests in the order its embedding pass sends them (val, general, train), the
    stream of job i rotated by i / jobs of its length)."""
    from carryon_ray.data import load_splits
    from carryon_ray.embedding import token_rows
    from carryon_ray.rows import ROW_INPUT_IDS

    splits = load_splits(tokenizer, cfg.data, seed=cfg.train.seed)
    rows = [*token_rows(splits.val), *token_rows(splits.general or []), *token_rows(splits.train)]
    size = cfg.resources.embed_batch_size
    reqs = [{k: [r[k] for r in rows[at:at + size]] for k in rows[0]} for at in range(0, len(rows), size)]
    assert all(reqs) and sum(len(r[ROW_INPUT_IDS]) for r in reqs) == len(rows)
    return rows, [reqs[i * len(reqs) // jobs:] + reqs[:i * len(reqs) // jobs] for i in range(jobs)]


def takes(streams: list[list[dict]], budget: int) -> list[list[tuple[str, dict]]]:
    """The producer's forwards' requests: every job's requests through its fair queue, taken under
    the token budget (all queued at once: the producer busy, as under several jobs)."""
    from carryon_ray.producer import FairQueue, Request

    q = FairQueue()
    for i, stream in enumerate(streams):
        for batch in stream:
            req = Request(f"job{i}", batch)
            q.push(req.job, req.tokens(), req)
    out = []
    while q:
        out.append(q.take(budget))
    return out


def run_arm(producer, forwards: list[list], forward_cost: float) -> dict:
    from carryon_ray.rows import ROW_INPUT_IDS

    producer.forward_cost = forward_cost
    before_f, before_t = producer.forwards, producer.forward_tokens
    real = sum(len(x) for reqs in forwards for r in reqs for x in r.batch[ROW_INPUT_IDS])
    t0 = time.perf_counter()
    for reqs in forwards:
        producer.embed(reqs)
    seconds = time.perf_counter() - t0
    padded = producer.forward_tokens - before_t
    return {"base_forwards": producer.forwards - before_f, "padded_tokens": padded, "real_tokens": real,
            "padding_share": round(1 - real / padded, 4), "seconds": round(seconds, 2),
            "real_tokens_per_s": round(real / seconds, 1)}


def main() -> None:
    import torch

    from carryon_ray.base import FrozenBase
    from carryon_ray.config import load_config, parse_overrides
    from carryon_ray.embedding import calibrate
    from carryon_ray.producer import FORWARD_COST_TOKENS, Producer

    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a producer holding one CPU runs one)")
    p.add_argument("--quick", action="store_true", help="2 jobs, 1 round, 64 training rows")
    p.add_argument("--out", default=str(ROOT / "bench/results/producer-lengths.json"))
    args = p.parse_args()
    sets = list(args.set)
    if args.quick:
        args.jobs, args.rounds = 2, 1
        sets.append("data.builtin_size=64")
    torch.set_num_threads(args.threads)
    cfg = load_config(ROOT / args.config, parse_overrides(sets))
    base = FrozenBase.load(cfg.base)
    rows, streams = job_requests(cfg, base.tokenizer, args.jobs)
    forwards = takes(streams, cfg.resources.embed_max_batch_tokens)
    producer = Producer([cfg.base.model_dump(mode="json")], bases=[base])
    calib = calibrate([base], cfg.bridge, list(cfg.layers.shallow), rows[:32], cfg.tap_spec())
    for i in range(args.jobs):
        producer.add_job(f"job{i}", calib)
    producer.embed(forwards[0])  # warm: first-call allocations
    arms = {"one_forward": float("inf"), "by_length": FORWARD_COST_TOKENS}
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    for r in range(args.rounds):
        for name in (arms if r % 2 == 0 else reversed(list(arms))):
            runs[name].append(run_arm(producer, forwards, arms[name]))
            print(f"round {r + 1} {name}: {runs[name][-1]}", flush=True)
    best = {name: min(rs, key=lambda x: x["seconds"]) for name, rs in runs.items()}
    out = {"config": args.config, "overrides": sets, "jobs": args.jobs, "rounds": args.rounds,
           "torch_threads": args.threads, "takes": len(forwards), "forward_cost_tokens": FORWARD_COST_TOKENS,
           "max_batch_tokens": cfg.resources.embed_max_batch_tokens, "runs": runs,
           "by_length_over_one_forward": {
               "padded_tokens": round(best["by_length"]["padded_tokens"] / best["one_forward"]["padded_tokens"], 3),
               "seconds_best": round(best["by_length"]["seconds"] / best["one_forward"]["seconds"], 3),
               "real_tokens_per_s_best": round(best["by_length"]["real_tokens_per_s"]
                                               / best["one_forward"]["real_tokens_per_s"], 3)}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["by_length_over_one_forward"]))


if __name__ == "__main__":
    main()
