"""Why a Ray job measured beside other work is slower than the other work's share predicts.

Ray starts its worker processes at niceness 15 (the raylet's `worker_niceness`), so that a node's
raylet and drivers stay responsive. The Linux scheduler then gives a nice-15 process about 1/29 of the
CPU a nice-0 process gets when both want the same core. Beside a benchmark or a test that computes in
its own (nice-0) process, a job's actors and Ray Data tasks barely run.

This script measures it on a fresh local Ray: the niceness a task reports, and the time to import
torch and transformers in a new worker process against a plain subprocess, first on a quiet machine,
then beside `--busy` nice-0 busy loops (one per core by default). Writes JSON with the ratios.

    python bench/worker_niceness.py --out bench/results/worker-niceness.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORTS = "import time; t = time.perf_counter(); import torch, transformers; print(time.perf_counter() - t)"


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def plain_import_s() -> float:
    out = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="nice-0 busy loops in the second phase")
    p.add_argument("--out", default=str(ROOT / "bench/results/worker-niceness.json"))
    args = p.parse_args()

    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")

    @ray.remote(max_calls=1)  # a new worker process per call: each import is a cold one
    def worker_import() -> dict:
        t = time.perf_counter()
        import torch  # noqa: F401
        import transformers  # noqa: F401

        return {"seconds": time.perf_counter() - t, "niceness": os.nice(0)}

    report: dict = {"machine": {"cpus": os.cpu_count()}, "phases": {}}
    ray.get(worker_import.remote())  # the first worker's start-up and the disk cache, not measured
    plain_import_s()
    for phase, busy in (("quiet", 0), ("beside_busy_loops", args.busy)):
        stop = mp.Event()
        loops = [mp.Process(target=_spin, args=(stop,)) for _ in range(busy)]
        for lp in loops:
            lp.start()
        try:
            time.sleep(1.0)
            plain = plain_import_s()
            t = time.perf_counter()
            w = ray.get(worker_import.remote())
            wall = time.perf_counter() - t
        finally:
            stop.set()
            for lp in loops:
                lp.join()
        report["phases"][phase] = {"busy_nice0_loops": busy, "plain_process_import_s": round(plain, 2),
                                   "ray_worker_import_s": round(w["seconds"], 2), "ray_task_wall_s": round(wall, 2),
                                   "ray_worker_niceness": w["niceness"], "driver_niceness": os.nice(0),
                                   "worker_over_plain": round(w["seconds"] / plain, 2)}
        print(phase, json.dumps(report["phases"][phase]), flush=True)
    ray.shutdown()
    q, b = report["phases"]["quiet"], report["phases"]["beside_busy_loops"]
    report["busy_over_quiet_worker"] = round(b["ray_worker_import_s"] / q["ray_worker_import_s"], 2)
    report["busy_over_quiet_plain"] = round(b["plain_process_import_s"] / q["plain_process_import_s"], 2)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
