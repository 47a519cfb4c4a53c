"""What the test suite's tiny base costs per training run, with a small vocabulary against
SmolLM2's 49,152 tokens (issue 31: most of the suite is tiny runs).

`carryon train` on configs/tiny-test.yaml with the first job test's overrides (replay, the general
guard, held-out answers), in-process, on two tiny random Llamas that differ only in the tokenizer
(tests/conftest.py: make_tiny_base), alternating rounds in one process so both see the same hour.
Reports each run's wall and CPU-seconds (the child's user + system). Writes
bench/results/tiny-base-vocab.json. Run: python bench/tiny_base.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from job_cpu import SETS  # noqa: E402  the first job test's overrides, one list


def train_once(base: str, out: str) -> dict:
    sets = [f"base.name={base}", f"output.dir={out}", *SETS]
    before = os.times()
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "carryon_cli", "train", "--config", "configs/tiny-test.yaml",
                          *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    wall, after = time.time() - t0, os.times()
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((Path(out) / "summary.json").read_text())
    return {"wall_seconds": round(wall, 2),
            "cpu_seconds": round(after.children_user + after.children_system - before.children_user
                                 - before.children_system, 2),
            "val_loss_before": summary["val_loss_before"], "val_loss_after": summary["val_loss_after"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench/results/tiny-base-vocab.json"))
    args = ap.parse_args()
    from conftest import TINY_VOCAB, make_tiny_base

    from carryon_ray.base import resolve_base_path
    from carryon_ray.config import BaseModelConfig

    smol, _ = resolve_base_path(BaseModelConfig(name="smollm2-135m-instruct"))
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-tiny-base-") as tmp:
        bases = {"small_vocab": make_tiny_base(Path(tmp) / "small", smol),
                 "full_vocab": make_tiny_base(Path(tmp) / "full", smol, full_vocab=True)}
        for i in range(args.rounds):
            for arm, base in bases.items():
                runs.append({"round": i, "arm": arm, **train_once(base, f"{tmp}/out-{arm}-{i}")})
                print(json.dumps(runs[-1]), flush=True)
    med = {arm: {k: statistics.median(r[k] for r in runs if r["arm"] == arm) for k in ("wall_seconds", "cpu_seconds")}
           for arm in ("small_vocab", "full_vocab")}
    out = {"what": "carryon train on configs/tiny-test.yaml (the first job test's overrides), in-process, on a tiny "
                   f"random Llama with a {TINY_VOCAB}-token retrained SmolLM2 tokenizer against the same model with "
                   "SmolLM2's 49,152-token one; alternating rounds in one process",
           "machine": {"cpus": os.cpu_count()}, "medians": med,
           "full_over_small": {k: round(med["full_vocab"][k] / med["small_vocab"][k], 2) for k in med["small_vocab"]},
           "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}))


if __name__ == "__main__":
    main()
