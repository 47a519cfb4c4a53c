"""Many customizations, one base per node (issue 33): N demo-size jobs through the cluster's shared
producer service at once, against the same N jobs one after another, each with its own producers
(the path every job took before the service existed).

On one fresh local cluster (`carryon up`, --cpus logical CPUs on this machine) this script:
  1. runs the N jobs one after another with `resources.producers=job`: each starts its own
     producers, which load the base, and stops them when its embedding ends;
  2. starts the shared service (`carryon producers start`, one producer) and submits the N jobs at
     once with `resources.producers=shared`, once per --trainers value: `job` (each fit on a Ray
     Train run of its own) and `shared` (every fit in the trainer service, `carryon trainers
     start` with a slot per job: one process instead of a Train controller and worker per job);
  3. meanwhile samples the cluster every second: base copies held = live EmbeddingProducer actors
     plus running tasks that load the base themselves (calibrate, held-out scoring);
  4. (coserve) deploys `carryon serve serve/local.yaml` and runs 16 closed-loop chat clients
     (max_tokens 32) alone, then while --coserve-jobs jobs embed through its replica
     (`resources.producers=coserve`), then while the same jobs embed through a dedicated producer
     started for them (a second base copy on the same cores): latency p50 / p99 of requests in
     flight while job chunks ran, against the clients alone; the jobs' embedded tokens/s; the
     system's peak memory over the clients-alone level.
Both runs use the same cluster, the same config (configs/demo.yaml with the overrides below) and the
same logical CPUs. Writes bench/results/shared-producers.json: `concurrent_over_sequential` (the
trainer-service run when there is one), `trainer_service_over_ray_train_concurrent`,
`base_copies_per_node` (peak during the concurrent run; one node here), `coserve_p50_over_idle`,
`coserve_p99_over_idle` (and `dedicated_*` for the dedicated producer), `coserve_tokens_per_s_over_dedicated`,
`coserve_peak_mem_saved_mb` and the absolute figures.
`--quick` (make bench) runs 2 jobs of a tiny random-weight base. Run alone.

    python bench/shared_producers.py [--jobs 8] [--cpus 8] [--trainers job,shared] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CARRYON_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Every job: the demo's carry-on and data, no MLflow (tracking off), no registry.
COMMON = ["mlflow.register_as=null", "resources.train_cpus=0.5", "resources.embed_actors_min=1",
          "resources.embed_actors_max=1"]
LOADS_BASE = ("calibrate", "score_heldout_remote")  # tasks that load a base copy of their own


class Sampler(threading.Thread):
    """Peak base copies on the cluster, sampled every second through Ray's state API."""

    def __init__(self, address: str):
        super().__init__(daemon=True)
        self.address, self.peak, self.samples, self.stop_flag = address, 0, [], threading.Event()

    def run(self) -> None:
        from ray.util.state import list_actors, list_tasks

        while not self.stop_flag.is_set():
            try:
                actors = list_actors(address=self.address, filters=[("state", "=", "ALIVE")], limit=10_000,
                                     raise_on_missing_output=False)
                tasks = list_tasks(address=self.address, filters=[("state", "=", "RUNNING")], limit=10_000,
                                   raise_on_missing_output=False)
                # Plain tasks only: a producer's own methods (EmbeddingProducer.calibrate) run on
                # the base it holds, and counting them counted that base twice.
                n = (sum(a.class_name == "EmbeddingProducer" for a in actors)
                     + sum(t.type == "NORMAL_TASK" and any(k in (t.name or "") for k in LOADS_BASE) for t in tasks))
                self.samples.append(n)
                self.peak = max(self.peak, n)
            except Exception:  # noqa: BLE001 - a missed sample is not a result
                pass
            self.stop_flag.wait(1.0)


def job(env: dict, config: str, out: Path, sets: list[str]) -> subprocess.Popen:
    """A job driver whose output goes to a file beside its outputs (a pipe nobody reads while the
    job runs would fill and stop it)."""
    cmd = [sys.executable, "-m", "jobs.customize", "--config", config, "--set", f"output.dir={out}"]
    cmd += [a for s in COMMON + sets for a in ("--set", s)]
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, stdout=open(out / "job.log", "w"), stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=ROOT)
    proc.log = out / "job.log"
    return proc


def finish(proc: subprocess.Popen, timeout: float) -> dict:
    proc.wait(timeout=timeout)
    text = proc.log.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"a job failed:\n{text[-4000:]}")
    result = next(line for line in text.splitlines() if line.startswith("RESULT "))
    return json.loads(result[len("RESULT "):])


def pct(xs: list[float], q: float) -> float | None:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else None


def coserve(args, tmp: str, state: dict, env: dict, sets: list[str], n_jobs: int) -> dict:
    """16 closed-loop chat clients (max_tokens 32) on the Serve app's one replica: first alone, then
    while `n_jobs` jobs embed through that replica (resources.producers=coserve), then while the same
    jobs embed through a dedicated producer (the shared service with one producer, started for that
    phase: a second copy of the base on the same cores). A request counts as "under embedding" when
    job chunks ran while it was in flight (the replica's beside_done, or the producer's forwards,
    moved). Each phase also records the system's peak memory over the clients-alone level and the
    jobs' embedded tokens/s: padded tokens over the span from the first chunk's start to the last's
    end, as the replica (beside_tokens, beside_first_at/last_at) or producer (tokens,
    first/last_forward_at) counts them."""
    import httpx
    import psutil

    from jobs import local_cluster

    key = "bench-key"
    (Path(tmp) / "keys.yaml").write_text(f"{key}: demo\n")
    port = local_cluster.free_port()
    serve_sets = [a for s in sets if s.startswith("base.") for a in ("--set", s)]
    res = subprocess.run([sys.executable, "-m", "carryon_cli", "serve", "serve/local.yaml", "--set",
                          f"auth.keys_file={tmp}/keys.yaml", "--set", "registry.enabled=false", *serve_sets, "--state-dir", f"{tmp}/cluster", "--port",
                          str(port)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    if res.returncode != 0:
        raise SystemExit(f"serve did not start:\n{res.stdout[-2000:]}{res.stderr[-3000:]}")
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
    model = httpx.get(f"{url}/v1/models", headers=headers, timeout=60).json()["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": "Write one sentence about the sea."}],
            "max_tokens": 32, "temperature": 0, "ignore_eos": True}
    cli = [sys.executable, "-m", "carryon_cli", "producers"]

    def clients(seconds: float | None, stop: threading.Event) -> list[tuple[float, float, int]]:
        done: list[tuple[float, float, int]] = []

        def loop():
            with httpx.Client(timeout=600) as c:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    r = c.post(f"{url}/v1/chat/completions", json=body, headers=headers)
                    done.append((t0, time.perf_counter(), r.status_code))

        threads = [threading.Thread(target=loop, daemon=True) for _ in range(16)]
        for t in threads:
            t.start()
        if seconds is not None:
            time.sleep(seconds)
            stop.set()
        return done, threads

    def replica() -> dict:
        return httpx.get(f"{url}/v1/carryon/stats", headers=headers, timeout=60).json()

    def producer() -> dict:  # the dedicated producer's counters (one producer), summed over its list
        res = subprocess.run([*cli, "status", "--state-dir", f"{tmp}/cluster"], capture_output=True, text=True,
                             cwd=ROOT, env=env, timeout=120)
        per = json.loads(res.stdout).get("per_producer", []) if res.returncode == 0 else []
        return {"done": sum(p.get("forwards", 0) for p in per), "tokens": sum(p.get("tokens", 0) for p in per),
                "forward_tokens": sum(p.get("forward_tokens", 0) for p in per),
                "first_at": min((p["first_forward_at"] for p in per if p.get("first_forward_at")), default=None),
                "last_at": max((p["last_forward_at"] for p in per if p.get("last_forward_at")), default=None)}

    warm = threading.Event()
    _, threads = clients(5 if args.quick else 15, warm)  # warm-up: first requests compile and allocate
    for t in threads:
        t.join()
    stop = threading.Event()
    idle_mem: list[int] = []
    idle, threads = clients(None, stop)
    t_end = time.perf_counter() + args.idle_s
    while time.perf_counter() < t_end:
        idle_mem.append(psutil.virtual_memory().used)
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    idle_lat = [b - a for a, b, code in idle if code == 200]
    idle_used = max(idle_mem)

    def phase(kind: str, progress) -> dict:
        """The clients while n_jobs jobs embed through `kind`; `progress()` -> the path's counters
        (done: chunks or forwards run; tokens; first_at/last_at)."""
        before = progress()
        marks: list[tuple[float, int]] = [(time.perf_counter(), before["done"])]
        peak = 0
        stop = threading.Event()
        busy, threads = clients(None, stop)
        t0 = time.perf_counter()
        procs = [job(env, "configs/demo.yaml", Path(tmp) / f"{kind}-{i}", sets + [f"resources.producers={kind}"])
                 for i in range(n_jobs)]
        while any(p.poll() is None for p in procs):
            peak = max(peak, psutil.virtual_memory().used)
            if kind == "coserve":  # the replica's counter is one cheap HTTP call; the producer's a CLI run
                marks.append((time.perf_counter(), progress()["done"]))
            time.sleep(0.5)
        jobs_wall = time.perf_counter() - t0
        after = progress()
        marks.append((time.perf_counter(), after["done"]))
        stop.set()
        for t in threads:
            t.join()
        results = [finish(p, 60) for p in procs]

        def embedding(a: float, b: float) -> bool:  # did job chunks run while [a, b] was in flight?
            if kind != "coserve":  # no samples: the producer's span, on the wall clock, stands in
                a0 = time.time() - time.perf_counter()
                return (after["first_at"] or 0) <= a + a0 and b + a0 <= (after["last_at"] or 0)
            lo = max((n for t, n in marks if t <= a), default=marks[0][1])
            hi = min((n for t, n in marks if t >= b), default=marks[-1][1])
            return hi > lo

        under = [b - a for a, b, code in busy if code == 200 and embedding(a, b)]
        tokens = after["tokens"] - before["tokens"]
        span = (after["last_at"] or 0) - max(after["first_at"] or 0, t0 + time.time() - time.perf_counter())
        return {"jobs": n_jobs, "under_embedding_requests": len(under), "under_embedding_p50_s": pct(under, 0.5),
                "under_embedding_p99_s": pct(under, 0.99), "errors": sum(code != 200 for _, _, code in busy),
                "chunks_run": after["done"] - before["done"], "embedded_tokens": tokens,
                # the producer's base forwards' padded tokens: over embedded_tokens (each request alone), what merging padded
                **({"forward_tokens": after["forward_tokens"] - before["forward_tokens"]} if "forward_tokens" in after else {}),
                "embedding_span_s": round(span, 1), "tokens_per_s": round(tokens / span, 1) if span > 0 else None,
                "jobs_wall_s": round(jobs_wall, 1), "peak_mem_over_idle_mb": round((peak - idle_used) / 2**20),
                "job_producers": sorted({r.get("producers") for r in results}),
                "job_val_loss_after": [round(r["val_loss_after"], 4) for r in results]}

    def replica_progress() -> dict:
        st = replica()
        return {"done": st.get("beside_done", 0), "tokens": st.get("beside_tokens", 0),
                "first_at": st.get("beside_first_at"), "last_at": st.get("beside_last_at")}

    replica_first = replica_progress()["first_at"]
    out = {"clients": 16, "max_tokens": 32, "jobs": n_jobs, "idle_requests": len(idle_lat),
           "idle_p50_s": pct(idle_lat, 0.5), "idle_p99_s": pct(idle_lat, 0.99),
           "idle_used_mb": round(idle_used / 2**20), "coserve": phase("coserve", replica_progress)}
    if replica_first is not None:  # the span must start with these jobs: the replica ran none before
        out["coserve"]["note"] = "the replica had run job chunks before this phase; its span starts earlier"
    # the replica's own account: time in job chunks run after decode steps over the steps' time
    # (engine.embed_share bounds it); the rest of the slowdown is the jobs' processes on the cores
    out["replica_beside_share"] = replica().get("beside_share")
    # The same jobs through a dedicated producer: the shared service with one producer, started now
    t1 = time.perf_counter()
    res = subprocess.run([*cli, "start", "--state-dir", f"{tmp}/cluster", "--config", "configs/demo.yaml",
                          *[a for s in COMMON + sets for a in ("--set", s)]], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=900)
    if res.returncode != 0:
        raise SystemExit(f"producers did not start:\n{res.stdout[-2000:]}{res.stderr[-3000:]}")
    out["dedicated_start_s"] = round(time.perf_counter() - t1, 1)
    try:
        out["dedicated"] = phase("shared", producer)
    finally:
        subprocess.run([*cli, "stop", "--state-dir", f"{tmp}/cluster"], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "carryon_cli", "serve", "--stop", "--state-dir", f"{tmp}/cluster"],
                   capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    return out


def concurrent_run(env: dict, tmp: str, n: int, sets: list[str], gcs: str, trainers: str, trainer_cpus: float) -> dict:
    """The n jobs at once through the shared producers; `trainers` = job (each its own Ray Train
    run) or shared (the cluster's trainer service, started here with a slot per job and stopped
    after). Returns the run's figures."""
    base = Path(tmp) / f"con-{trainers}"
    cli = [sys.executable, "-m", "carryon_cli", "trainers"]
    start_s = 0.0
    if trainers == "shared":
        t1 = time.perf_counter()
        res = subprocess.run([*cli, "start", "--state-dir", f"{tmp}/cluster", "--slots", str(n),
                              "--cpus", str(trainer_cpus)], capture_output=True, text=True, cwd=ROOT, env=env,
                             timeout=600)
        if res.returncode != 0:
            raise SystemExit(f"trainers did not start:\n{res.stdout[-2000:]}{res.stderr[-3000:]}")
        start_s = time.perf_counter() - t1
        print(f"trainer service ready in {start_s:.1f} s", flush=True)
    sampler = Sampler(gcs)
    sampler.start()
    t0 = time.perf_counter()
    procs = [job(env, "configs/demo.yaml", base / str(i), sets + ["resources.producers=shared",
                                                                  f"resources.trainers={trainers}"])
             for i in range(n)]
    results = [finish(proc, 3600) for proc in procs]
    wall = time.perf_counter() - t0
    sampler.stop_flag.set()
    sampler.join()
    status = subprocess.run([sys.executable, "-m", "carryon_cli", "producers", "status", "--state-dir",
                             f"{tmp}/cluster"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    seen = json.loads(status.stdout) if status.returncode == 0 else {"error": status.stderr[-500:]}
    per = seen.get("per_producer", [])
    if trainers == "shared":
        subprocess.run([*cli, "stop", "--state-dir", f"{tmp}/cluster"], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=120)
    return {"wall_s": round(wall, 1), "trainers": trainers, "trainers_start_s": round(start_s, 1),
            "job_wall_s": [r["wall_seconds"] for r in results], "base_copies_peak": sampler.peak,
            "trained_on": sorted({r.get("trainers") for r in results}),
            "heldout_scored_on": sorted({(r.get("heldout") or {}).get("scored_on") for r in results} - {None}),
            "stage_seconds_median": stage_medians(results), "producer_tokens": sum(p.get("tokens", 0) for p in per),
            "producer_forward_tokens": sum(p.get("forward_tokens", 0) for p in per),
            "producer_tokens_per_s": producer_rate(per),
            "producer_calls": seen.get("calls"), "forwards": sum(p.get("forwards", 0) for p in per),
            "forwards_shared_by_jobs": sum(p.get("shared_forwards", 0) for p in per),
            "val_loss_after": [round(r["val_loss_after"], 6) for r in results]}


def stage_medians(results: list[dict]) -> dict[str, float]:
    """Median seconds per stage of the jobs' runs (summary.json's stage_seconds)."""
    import statistics

    stages = [r.get("stage_seconds") or {} for r in results]
    return {k: round(statistics.median(s.get(k, 0.0) for s in stages), 1) for k in (stages[0] if stages else {})}


def producer_rate(per: list[dict]) -> float | None:
    """Padded tokens/s of the service's producers from their first forward to their last."""
    spans = [p["last_forward_at"] - p["first_forward_at"] for p in per if p.get("first_forward_at")]
    return round(sum(p.get("tokens", 0) for p in per) / sum(spans), 1) if spans and sum(spans) > 0 else None


def forward_rate(sets: list[str]) -> dict:
    """The base's forward alone in this process at one torch thread (the producers' setting), by
    batch shape: what the producers' rate in the runs is to be read against."""
    import torch

    from carryon_ray.base import FrozenBase
    from carryon_ray.config import BaseModelConfig

    name = next((s.split("=", 1)[1] for s in sets if s.startswith("base.name=")), "smollm2-135m-instruct")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = FrozenBase.load(BaseModelConfig(name=name))
        rates = {}
        for rows, length in ((8, 17), (32, 19), (136, 19)):
            ids = torch.randint(5, 1000, (rows, length))
            mask = torch.ones_like(ids)
            base.hidden_states(ids, mask, [])  # warm
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < 3.0:
                base.hidden_states(ids, mask, [])
                n += 1
            rates[f"{rows}x{length}"] = round(rows * length * n / (time.perf_counter() - t0), 1)
        return {"torch_threads": 1, "tokens_per_s": rates}
    finally:
        torch.set_num_threads(threads)


COSERVE_KEYS = ("coserve", "coserve_p50_over_idle", "coserve_p99_over_idle", "dedicated_p50_over_idle",
                "dedicated_p99_over_idle", "coserve_tokens_per_s_over_dedicated", "coserve_peak_mem_saved_mb")


def save(path: str, out: dict, parts: set[str]) -> None:
    """Written after each part, so a run stopped later keeps what it measured; a run of one part
    keeps the other part's figures from the file, and co-serving runs with other job counts under
    `coserve_by_jobs` (the top-level co-serving keys are the latest run's)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    by_jobs = {}
    if Path(path).exists() and parts != {"shared", "coserve"}:
        old = json.loads(Path(path).read_text())
        by_jobs = dict(old.get("coserve_by_jobs", {}))
        if "coserve" in old:
            by_jobs.setdefault(str(old["coserve"]["jobs"]), {k: old[k] for k in COSERVE_KEYS if k in old})
        out = {**old, **out}
    if "coserve" in out:
        by_jobs[str(out["coserve"]["jobs"])] = {k: out[k] for k in COSERVE_KEYS if k in out}
    if by_jobs:
        out["coserve_by_jobs"] = by_jobs
    Path(path).write_text(json.dumps(out, indent=2) + "\n")


def main() -> None:
    from jobs import local_cluster

    p = argparse.ArgumentParser()
    p.add_argument("--jobs", type=int, default=None, help="jobs (default 8; 2 with --quick)")
    p.add_argument("--trainers", default="job,shared", help="the concurrent runs' fits: job (Ray Train each), "
                   "shared (the trainer service); one concurrent run per value")
    p.add_argument("--trainer-cpus", type=float, default=1.0, help="CPUs the trainer service holds")
    p.add_argument("--no-sequential", action="store_true", help="skip the one-after-another run (the trainer "
                   "A/B needs only the concurrent ones)")
    p.add_argument("--cpus", type=int, default=8, help="logical CPUs the bench cluster advertises")
    p.add_argument("--quick", action="store_true", help="2 jobs on a tiny random-weight base")
    p.add_argument("--out", default=str(ROOT / "bench/results/shared-producers.json"))
    p.add_argument("--parts", default="shared,coserve", help="which measurements: shared, coserve")
    p.add_argument("--coserve-jobs", type=int, default=4)
    p.add_argument("--idle-s", type=float, default=60.0, help="seconds of the clients alone")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    if args.quick:
        args.idle_s, args.coserve_jobs = 10.0, 1
    n = args.jobs or (2 if args.quick else 8)
    with tempfile.TemporaryDirectory(prefix="bench-shared-") as tmp:
        sets = []
        if args.quick:
            sys.path.insert(0, str(ROOT / "tests"))
            from conftest import make_tiny_base

            from carryon_ray.base import resolve_base_path
            from carryon_ray.config import BaseModelConfig

            smol, _ = resolve_base_path(BaseModelConfig(name="smollm2-135m-instruct"))
            sets = [f"base.name={make_tiny_base(Path(tmp) / 'tiny', smol)}", "data.builtin_size=96"]
        state = local_cluster.up(f"{tmp}/cluster", num_cpus=args.cpus, with_mlflow=False)
        env = {**os.environ, **local_cluster.client_env(state), "RAY_ADDRESS": state["ray_address"],
               "PYTHONPATH": str(ROOT)}
        env.pop("MLFLOW_TRACKING_URI", None)
        os.environ.update(local_cluster.client_env(state))
        gcs = state["ray_address"]
        out: dict = {"jobs": n, "quick": args.quick, "config": "configs/demo.yaml", "overrides": COMMON + sets,
                     "machine": {"cpus": os.cpu_count(), "logical_cpus": args.cpus}, "nodes": 1}
        try:
            if "shared" in parts:
                out["forward_rate_alone"] = forward_rate(sets)
            if "shared" in parts and not args.no_sequential:
                # 1. one after another, each job with its own producers (today's path)
                sampler = Sampler(gcs)
                sampler.start()
                t0, walls, results = time.perf_counter(), [], []
                for i in range(n):
                    t1 = time.perf_counter()
                    results.append(finish(job(env, "configs/demo.yaml", Path(tmp) / f"seq-{i}",
                                              sets + ["resources.producers=job"]), 1800))
                    walls.append(round(time.perf_counter() - t1, 1))
                    print(f"sequential job {i + 1}/{n}: {walls[-1]} s", flush=True)
                sequential = time.perf_counter() - t0
                sampler.stop_flag.set()
                sampler.join()
                out["sequential"] = {"wall_s": round(sequential, 1), "job_wall_s": walls,
                                     "base_copies_peak": sampler.peak, "stage_seconds_median": stage_medians(results),
                                     "val_loss_after": [round(r["val_loss_after"], 6) for r in results]}
                save(args.out, out, parts)
            if "shared" in parts:
                # 2. the shared producers, then all jobs at once: each job's fit on Ray Train of its
                #    own, and (--trainers) on the cluster's trainer service, one run each
                t1 = time.perf_counter()
                res = subprocess.run([sys.executable, "-m", "carryon_cli", "producers", "start", "--state-dir",
                                      f"{tmp}/cluster", "--config", "configs/demo.yaml",
                                      *[a for s in COMMON + sets for a in ("--set", s)]],
                                     capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
                if res.returncode != 0:
                    raise SystemExit(f"producers did not start:\n{res.stdout[-2000:]}{res.stderr[-3000:]}")
                start_s = time.perf_counter() - t1
                print(f"shared producers ready in {start_s:.1f} s", flush=True)
                for trainers in args.trainers.split(","):
                    run = concurrent_run(env, tmp, n, sets, gcs, trainers, args.trainer_cpus)
                    run["service_start_s"] = round(start_s, 1)
                    key = "concurrent" if trainers == "job" else f"concurrent_trainers_{trainers}"
                    out[key] = run
                    print(f"{n} jobs at once (trainers={trainers}): {run['wall_s']} s", flush=True)
                first = out.get("concurrent_trainers_shared") or out["concurrent"]
                out["base_copies_per_node"] = first["base_copies_peak"]
                if "sequential" in out:
                    out["concurrent_over_sequential"] = round(first["wall_s"] / out["sequential"]["wall_s"], 3)
                    out["concurrent_with_service_start_over_sequential"] = round(
                        (first["wall_s"] + start_s + first.get("trainers_start_s", 0)) / out["sequential"]["wall_s"], 3)
                    out["sequential_base_copies_per_node"] = out["sequential"]["base_copies_peak"]
                subprocess.run([sys.executable, "-m", "carryon_cli", "producers", "stop", "--state-dir", f"{tmp}/cluster"],
                               capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)  # its base copy goes
                if "concurrent" in out and "concurrent_trainers_shared" in out:
                    out["trainer_service_over_ray_train_concurrent"] = round(
                        out["concurrent_trainers_shared"]["wall_s"] / out["concurrent"]["wall_s"], 3)
                save(args.out, out, parts)
            if "coserve" in parts:
                out["coserve"] = cos = coserve(args, tmp, state, env, sets, args.coserve_jobs)
                for name, ph in (("coserve", cos["coserve"]), ("dedicated", cos["dedicated"])):
                    if cos["idle_p50_s"] and ph["under_embedding_p50_s"]:
                        out[f"{name}_p50_over_idle"] = round(ph["under_embedding_p50_s"] / cos["idle_p50_s"], 3)
                        out[f"{name}_p99_over_idle"] = round(ph["under_embedding_p99_s"] / cos["idle_p99_s"], 3)
                if cos["coserve"]["tokens_per_s"] and cos["dedicated"]["tokens_per_s"]:
                    out["coserve_tokens_per_s_over_dedicated"] = round(
                        cos["coserve"]["tokens_per_s"] / cos["dedicated"]["tokens_per_s"], 3)
                # memory of serving plus the jobs: what co-serving saves (target: one base copy)
                out["coserve_peak_mem_saved_mb"] = (cos["dedicated"]["peak_mem_over_idle_mb"]
                                                    - cos["coserve"]["peak_mem_over_idle_mb"])
        finally:
            local_cluster.down(f"{tmp}/cluster")
    save(args.out, out, parts)
    print(json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}, indent=2))


if __name__ == "__main__":
    main()
