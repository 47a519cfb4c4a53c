"""End to end (issue 5, item 7): wall time and peak memory of `make demo` from an installed venv.

`make demo` starts a local Ray head and an MLflow server (`carryon up`), submits the demo
customization as a Ray job, waits for it, and generates from the adapter it registered. Those
processes are daemons, not children of `make`, so peak memory is read two ways while it runs:

- system: the rise of the machine's used memory (MemTotal - MemAvailable) over its value just
  before the start; it counts everything the demo started (Ray's raylets, workers, object store
  pages, MLflow) and anything else that ran meanwhile, so run this alone.
- processes: the largest sum of resident set sizes over processes that started after the
  benchmark did (shared pages are counted once per process, so it over-counts forked workers).

The venv must already be installed (`make install`), and no carryon cluster may be up here: the
benchmark stops the cluster it started (`carryon down`) and nothing else. With `--fresh` it runs
`make demo` in a fresh clone of this commit instead, as a newcomer does: the install, the first-run
conversion of the bundled base and the demo, all counted in the wall time and the printed lines.
Writes bench/results/demo.json. Run: python bench/demo.py [--fresh]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
# A Ray core log line at error level, however a worker's prefix starts it: "[2026-12-02 14:40:14,090 E 8049 ..."
RAY_ERROR = re.compile(r"\[\d{4}-\d\d-\d\d [\d:,.]+ E \d+ ")


def alarming(line: str) -> bool:
    """A line a newcomer reads as a failure (issue 31): Ray core errors, warnings, "waiting", tracebacks."""
    return (bool(RAY_ERROR.search(line)) or "warning" in line.lower() or "waiting for" in line
            or "Traceback" in line)


def used_mb() -> float:
    vm = psutil.virtual_memory()
    return (vm.total - vm.available) / 2**20


def rss_of_new_processes(since: float) -> tuple[float, int]:
    total, n = 0, 0
    for p in psutil.process_iter(["create_time", "memory_info"]):
        info = p.info
        if info["create_time"] and info["create_time"] >= since and info["memory_info"]:
            total += info["memory_info"].rss
            n += 1
    return total / 2**20, n


class Sampler(threading.Thread):
    """Polls memory every `period` seconds until stopped; keeps the peaks and when they happened."""

    def __init__(self, start: float, period: float = 0.5):
        super().__init__(daemon=True)
        self.start_time, self.period = start, period
        self.baseline = used_mb()
        self.peak_system, self.peak_rss, self.peak_procs, self.peak_at = 0.0, 0.0, 0, 0.0
        self.samples = 0
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            system = used_mb() - self.baseline
            rss, n = rss_of_new_processes(self.start_time)
            if system > self.peak_system:
                self.peak_system, self.peak_at = system, time.time() - self.start_time
            if rss > self.peak_rss:
                self.peak_rss, self.peak_procs = rss, n
            self.samples += 1
            self._halt.wait(self.period)

    def stop(self):
        self._halt.set()
        self.join()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="demo", help="make target to time")
    p.add_argument("--out", default=str(ROOT / "bench/results/demo.json"))
    p.add_argument("--fresh", action="store_true", help="a fresh clone of HEAD: install, first-run conversion and demo")
    args = p.parse_args()
    if not args.fresh:
        return run(ROOT, args.target, args.out)
    with tempfile.TemporaryDirectory(prefix="carryon-fresh-") as tmp:
        clone = Path(tmp) / "carryon-ray"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True,
                                text=True).stdout.strip()
        return run(clone, args.target, args.out, fresh=commit)


def run(root: Path, target: str, out: str, fresh: str | None = None) -> int:
    """Time `make <target>` in `root` (a fresh clone: `fresh` is its commit) and write the record."""
    carryon = root / ".venv/bin/carryon"
    if not fresh and not (root / ".venv/.installed").exists():
        sys.exit("bench/demo.py: the venv is not installed; run `make install` first (or time a fresh clone: --fresh)")
    # No cluster of this checkout may be up: the demo must start cold (a fresh clone has none).
    status = subprocess.run([str(carryon), "status"], cwd=root, capture_output=True, text=True) if not fresh else None
    if status is not None and status.returncode == 0 and "no carryon cluster" not in status.stdout + status.stderr:
        sys.exit("bench/demo.py: a carryon cluster is already up here; stop it (`.venv/bin/carryon down`) so the demo starts cold")

    start = time.time()
    sampler = Sampler(start)
    sampler.start()
    t0 = time.perf_counter()
    # A fresh clone converts the bundled base into its own cache, as a new machine does.
    env = {**os.environ, "CARRYON_CACHE": str(root / ".cache")} if fresh else None
    proc = subprocess.run([os.environ.get("MAKE", "make"), target], cwd=root, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    sampler.stop()
    subprocess.run([str(carryon), "down"], cwd=root, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    result = {
        "target": f"make {target}" + (f" on a fresh clone of {fresh} (install and first-run conversion included)"
                                      if fresh else ""),
        "returncode": proc.returncode,
        "wall_seconds": round(wall, 1),
        "peak_system_mb_over_baseline": round(sampler.peak_system),
        "peak_system_at_s": round(sampler.peak_at, 1),
        "baseline_used_mb": round(sampler.baseline),
        "peak_rss_sum_new_processes_mb": round(sampler.peak_rss),
        "processes_at_rss_peak": sampler.peak_procs,
        "samples": sampler.samples,
        "machine": {"cpus": os.cpu_count(), "memory_mb": round(psutil.virtual_memory().total / 2**20)},
        "output_lines": len(log.splitlines()),  # what `make demo` prints (issue 31's target: <= 45, fresh)
        "log": log if fresh else log[-3000:],
        "alarming_lines": [ln[:300] for ln in log.splitlines() if alarming(ln)],
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "log"}, indent=2))
    print(f"wrote {out}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
