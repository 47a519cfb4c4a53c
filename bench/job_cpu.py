"""Where one tiny customization's CPU goes (issue 31: the test suite's time is mostly such jobs).

Starts a local cluster (`local_cluster.up`, MLflow included), submits the test suite's tiny job
(configs/tiny-test.yaml on a random-weight Llama with SmolLM2's tokenizer, the first job test's
overrides) through `ray job submit`, and samples every process on the machine every 0.3 s. A
process's CPU is its own user + system time (children not folded in), less what it had used before
the submission; processes are grouped by what they ran (`ray::ClassName` for actors, the module
for drivers). Run it alone: the machine's busy share counts everything. Writes
bench/results/job-cpu.json. Run: python bench/job_cpu.py
(`--ab idle_worker_killing_time_threshold_ms=1000`: the defaults against one raylet setting, alternating)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from cluster_start import busy_seconds  # noqa: E402  the machine's busy CPU-seconds, one reading
from jobs import local_cluster  # noqa: E402

SETS = ["data.pack_examples=true", "data.general_val=tests/data/general.txt", "data.replay=tests/data/general.txt",
        "data.replay_ratio=0.1", "alpha.general_guard=0.05", "carryon.gate=true",
        "eval.heldout=builtin:topics-heldout", "eval.heldout_size=6", "eval.max_new_tokens=2"]


def label(p: psutil.Process) -> str:
    """ray::Class (an actor or task worker, by what it last ran) or the program and its module."""
    name, cmd = p.name(), p.cmdline()
    if name.startswith("ray::") or (cmd and cmd[0].startswith("ray::")):
        return (cmd[0] if cmd and cmd[0].startswith("ray::") else name).split(" ")[0]
    if "-m" in cmd:
        return f"{name} -m {cmd[cmd.index('-m') + 1]}"
    script = next((Path(w).name for w in cmd[1:3] if w.endswith(".py")), "")
    return f"{name} {script}".strip()


class Sampler:
    """Last seen (label, cpu-seconds) of every process; a worker's label is the busiest it showed
    (an idle pooled worker reads `ray::IDLE` between tasks)."""

    def __init__(self):
        self.before = {p.pid: sum(p.cpu_times()[:2]) for p in psutil.process_iter()}
        self.seen: dict[int, tuple[str, float]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set():
            for p in psutil.process_iter():
                try:
                    name, cpu = label(p), sum(p.cpu_times()[:2])
                except (psutil.Error, OSError):
                    continue
                old = self.seen.get(p.pid, (name, 0.0))[0]
                keep = old if name in ("ray::IDLE", "") and old not in ("ray::IDLE", "") else name
                self.seen[p.pid] = (keep, cpu)
            time.sleep(0.3)

    def result(self) -> dict:
        self.stop.set()
        self.thread.join()
        me = os.getpid()
        agg, count = collections.defaultdict(float), collections.Counter()
        for pid, (name, cpu) in self.seen.items():
            used = cpu - self.before.get(pid, 0.0)
            if pid == me or used < 0.05:
                continue
            agg[name] += used
            count[name] += 1
        return {k: {"cpu_seconds": round(v, 1), "processes": count[k]} for k, v in sorted(agg.items(), key=lambda kv: -kv[1])}


def one_job(tiny: str, tmp: str, raylet: dict | None) -> tuple[float, float, dict]:
    """(wall s, machine busy CPU-s, CPU per process group) of one tiny submitted job on a fresh cluster."""
    state = local_cluster.up(f"{tmp}/cluster", num_cpus=2, raylet=raylet)
    try:
        time.sleep(5)  # the cluster settles; its start is bench/cluster_start.py's figure
        cmd = [str(ROOT / ".venv/bin/ray"), "job", "submit", "--address", state["dashboard_url"], "--working-dir",
               str(ROOT), "--runtime-env-json", json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": state["mlflow_url"]}}),
               "--", "python", "-m", "jobs.customize", "--config", "configs/tiny-test.yaml",
               *[a for s in [f"base.name={tiny}", f"output.dir={tmp}/out", *SETS] for a in ("--set", s)]]
        env = {**os.environ, **local_cluster.client_env(state), "PYTHONPATH": str(ROOT)}
        sampler, c0, t0 = Sampler(), busy_seconds(), time.time()
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
        wall, busy = time.time() - t0, busy_seconds() - c0
        per = sampler.result()
    finally:
        local_cluster.down(f"{tmp}/cluster")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return wall, busy, per


def summary(wall: float, busy: float, per: dict) -> dict:
    return {"wall_seconds": round(wall, 1), "machine_busy_cpu_seconds": round(busy, 1),
            "busy_share_of_cores": round(busy / wall / os.cpu_count(), 2),
            "sampled_cpu_seconds": round(sum(v["cpu_seconds"] for v in per.values()), 1),
            "processes": sum(v["processes"] for v in per.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(ROOT / "bench/results/job-cpu.json"))
    ap.add_argument("--ab", metavar="SETTING=VALUE", help="alternate rounds with this raylet setting overriding "
                    "local_cluster.SINGLE_MACHINE_RAYLET against rounds with the defaults (one process, so one hour)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of each arm with --ab")
    args = ap.parse_args()
    from conftest import make_tiny_base

    from carryon_ray.base import resolve_base_path
    from carryon_ray.config import BaseModelConfig

    what = ("one tiny job (configs/tiny-test.yaml, the first job test's overrides) through ray job submit on a "
            "warm local cluster, 2 logical CPUs; CPU per process group, sampled every 0.3 s")
    with tempfile.TemporaryDirectory(prefix="bench-job-cpu-") as tmp:
        smol, _ = resolve_base_path(BaseModelConfig(name="smollm2-135m-instruct"))
        tiny = make_tiny_base(Path(tmp) / "tiny", smol)
        if not args.ab:
            wall, busy, per = one_job(tiny, tmp, None)
            out = {"what": what, "machine": {"cpus": os.cpu_count()}, **summary(wall, busy, per), "by_process": per}
        else:
            key, value = args.ab.split("=", 1)
            override = {key: json.loads(value)}
            rounds = []
            for i in range(args.rounds):
                for arm, raylet in (("default", None), ("override", override)):
                    wall, busy, per = one_job(tiny, tmp, raylet)
                    rounds.append({"round": i, "arm": arm, **summary(wall, busy, per), "by_process": per})
                    print(json.dumps({k: v for k, v in rounds[-1].items() if k != "by_process"}), flush=True)
            med = {arm: {k: statistics.median(r[k] for r in rounds if r["arm"] == arm)
                         for k in ("wall_seconds", "machine_busy_cpu_seconds")} for arm in ("default", "override")}
            out = {"what": what + f"; alternating rounds, the defaults {local_cluster.SINGLE_MACHINE_RAYLET} "
                                  f"against {key}={value}",
                   "machine": {"cpus": os.cpu_count()}, "medians": med,
                   "default_over_override": {k: round(med["default"][k] / med["override"][k], 3) for k in med["default"]},
                   "rounds": rounds}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k not in ("by_process", "rounds")}))
    for k, v in list(out.get("by_process", {}).items())[:25]:
        print(f"{v['cpu_seconds']:7.1f} s  x{v['processes']:<3d} {k}")


if __name__ == "__main__":
    main()
