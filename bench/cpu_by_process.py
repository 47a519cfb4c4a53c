"""Where a run's CPU goes, by kind of process: samples every process on the machine each second
(/proc/<pid>/stat: user + system time) and adds each process's growth to its kind, named from its
command line (a pytest worker, a job driver, a Ray worker by its actor or task title, Ray's own
daemons, the MLflow server, ...). For the test suite, which keeps both cores busy: only less CPU
work makes it shorter, and this says whose work it is.

    python bench/cpu_by_process.py --out bench/results/suite-cpu.json -- make test

Runs the command after `--` and samples until it exits (or, without a command, until Ctrl-C).
Processes that live less than one sample are missed (their CPU is not counted); the total
machine's busy time over the run, from /proc/stat, is recorded beside the sum, so the share missed
is visible.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")

# (kind, pattern on the command line), first match wins; a process is classified by the last
# command line it showed (a Ray worker's is its current actor or task title)
KINDS = [
    ("job driver (jobs.customize)", r"-m jobs\.customize"),
    ("carryon CLI", r"-m carryon_cli|bin/carryon"),
    ("ray job submit CLI", r"bin/ray job|ray job submit"),
    ("pytest (main process and xdist workers)", r"-m pytest|bin/pytest|exec\(eval\(sys\.stdin"),
    ("mlflow server", r"bin/mlflow|mlflow\.server|gunicorn|huey"),
    ("ray dashboard", r"dashboard/dashboard\.py"),
    ("ray dashboard agent", r"dashboard/agent\.py"),
    ("ray runtime env agent", r"runtime_env/agent/main\.py"),
    ("ray log monitor", r"log_monitor\.py"),
    ("ray monitor", r"autoscaler/_private/monitor\.py"),
    ("ray worker (before its first task)", r"default_worker\.py"),
    ("ray start / client", r"bin/ray |ray/scripts/scripts\.py"),
]
BINARIES = {"raylet": "ray raylet", "gcs_server": "ray gcs_server"}


def kind_of(cmdline: str, comm: str) -> str:
    if cmdline.startswith("ray::"):
        title = cmdline[5:].split()[0] if cmdline[5:].strip() else "?"
        if title == "IDLE":
            return "ray worker (idle)"
        return f"ray worker: {re.split(r'[.:(]', title)[0] or title}"
    if comm in BINARIES:
        return BINARIES[comm]
    if comm.startswith("ray-dashboard"):  # the dashboard's module processes
        return "ray dashboard modules"
    for kind, pat in KINDS:
        if re.search(pat, cmdline):
            return kind
    if "python" in comm or "python" in cmdline.split(" ")[0]:
        words = [a for a in cmdline.split() if a and not a.startswith("-")][1:]
        return f"python {Path(words[0]).name if words else '-c'}"[:60]
    return comm or "?"


def snapshot() -> dict[int, tuple[int, str, str]]:
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            ticks = int(fields[11]) + int(fields[12])
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore").strip()
        except (OSError, ValueError, IndexError):
            continue
        out[int(d)] = (ticks, comm, cmd)
    return out


def busy_ticks() -> int:
    parts = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    vals = list(map(int, parts))
    return sum(vals) - vals[3] - vals[4]  # all but idle and iowait


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / "bench/results/suite-cpu.json"))
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the command to run and measure")
    args = p.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    me = os.getpid()
    seen: dict[int, list] = {}  # pid -> [ticks at last sight, CPU seconds in the run, comm, last command line]
    for pid, (ticks, comm, cmdline) in snapshot().items():  # what ran before counts from its current total
        seen[pid] = [ticks, 0.0, comm, cmdline]
    busy0, t0 = busy_ticks(), time.time()
    proc = subprocess.Popen(cmd) if cmd else None
    try:
        while proc is None or proc.poll() is None:
            time.sleep(args.interval)
            for pid, (ticks, comm, cmdline) in snapshot().items():
                if pid == me:
                    continue
                rec = seen.setdefault(pid, [0, 0.0, comm, cmdline])
                rec[1] += max(0, ticks - rec[0]) / TICK
                rec[0] = ticks
                if cmdline:
                    rec[2], rec[3] = comm, cmdline
    except KeyboardInterrupt:
        pass
    by_kind: dict[str, float] = {}
    processes: dict[str, int] = {}
    for ticks, cpu, comm, cmdline in seen.values():
        if cpu <= 0:
            continue
        k = kind_of(cmdline, comm)
        by_kind[k] = by_kind.get(k, 0.0) + cpu
        processes[k] = processes.get(k, 0) + 1
    wall = time.time() - t0
    busy = (busy_ticks() - busy0) / TICK
    counted = sum(by_kind.values())
    out = {"command": cmd, "wall_s": round(wall, 1), "machine_busy_cpu_s": round(busy, 1),
           "counted_cpu_s": round(counted, 1), "counted_share": round(counted / busy, 3) if busy else None,
           "exit_code": proc.returncode if proc else None, "interval_s": args.interval,
           "cpu_s_by_kind": {k: round(v, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]) if v >= 0.5},
           "processes_with_cpu_by_kind": dict(sorted(processes.items(), key=lambda kv: -kv[1]))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "processes_with_cpu_by_kind"}, indent=1))
    sys.exit(proc.returncode if proc else 0)


if __name__ == "__main__":
    main()
