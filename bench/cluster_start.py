"""What `carryon up` costs on this machine (issue 31): the wall until the Ray head, its job agent and
the MLflow server answer, the machine's busy CPU-seconds over that wall, and the MLflow processes
left running, with MLflow's server-side job runner on (its default) and off (jobs/local_cluster.py
turns it off), alternating in one process so both see the same hour. Every local cluster the test
suite starts pays this once. Writes bench/results/local-cluster-start.json.
Run: python bench/cluster_start.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jobs import local_cluster  # noqa: E402


def busy_seconds() -> float:
    """CPU-seconds the whole machine has spent outside idle and iowait since boot."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def mlflow_processes(state: dict) -> int:
    """The MLflow server's process and its descendants (uvicorn worker, job runner, huey consumers)."""
    try:
        root = psutil.Process(state["mlflow_pid"])
        return 1 + len(root.children(recursive=True))
    except psutil.NoSuchProcess:
        return 0


def one(job_execution: bool) -> dict:
    local_cluster.MLFLOW_SERVER_ENV["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "true" if job_execution else "false"
    state_dir = tempfile.mkdtemp(prefix="carryon-start-")
    c0, t0 = busy_seconds(), time.time()
    state = local_cluster.up(state_dir, num_cpus=2)
    wall, cpu = time.time() - t0, busy_seconds() - c0
    time.sleep(10)  # the job runner's consumers start after the server answers
    n = mlflow_processes(state)
    assert local_cluster.down(state_dir)
    return {"wall_seconds": round(wall, 1), "busy_cpu_seconds": round(cpu, 1), "mlflow_processes": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench/results/local-cluster-start.json"))
    args = ap.parse_args()
    runs = {"job_runner_on": [], "job_runner_off": []}
    for _ in range(args.rounds):
        for on in (True, False):
            runs["job_runner_on" if on else "job_runner_off"].append(one(on))
            print(on, runs["job_runner_on" if on else "job_runner_off"][-1], flush=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    out = {"what": "local_cluster.up (Ray head + job agent + MLflow server), 2 CPUs, medians of alternating rounds",
           "machine": {"cpus": os.cpu_count(), "memory_mb": psutil.virtual_memory().total // 2**20},
           "runs": runs, "median": med,
           "off_over_on": {m: round(med["job_runner_off"][m] / med["job_runner_on"][m], 3) for m in med["job_runner_on"]}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["median"]), json.dumps(out["off_over_on"]))


if __name__ == "__main__":
    main()
