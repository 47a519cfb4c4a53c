"""Serving on the real SmolLM2 base: the decode engine under many users, and the cost of adapters.

Ratios against baselines measured in the same run:

1. decode overhead per token: base alone vs base + MLP carry-on vs base + 2-layer transformer
   carry-on, batch 1 and 16;
2. 64 rows over 64 distinct adapters vs 64 rows on one adapter (target >= 0.95x throughput), the
   same with recycled-top adapters against the base, and 16 closed-loop clients over 8 recycled
   adapters of ranks 4/8/16/32 against the same load on the base alone (target >= 0.8x), and their
   decode step time against the base's (`recycled_steps`, two engines stepped alternately);
3. closed-loop load, in process (the replica's engine without HTTP): 1, 4, 16, 32 clients, each
   sending back to back with max_tokens drawn from 8..128 over 8 adapters + the bare base, plus one
   probe client sending max_tokens=8 requests. Two schedulers on the same kernels:
     - static: what `@serve.batch` did before (a batch is cut from what arrived within 20 ms, at
       most 16 rows, and runs until its last row ends; later arrivals wait for the next batch);
     - engine: carryon_ray.engine.Engine (rows join and leave at every step).
   Throughput (completion tokens/s), latency p50/p99, time to first token, and the probe's p50
   against its solo latency (target <= 3x); throughput at 16 clients against a batch-16 decode of
   equal lengths (target >= 0.8x);
4. 1,000 adapters cycling through a 32-slot LRU (loaded from disk on a miss, as the replica's
   multiplexed loader does) under 16 clients vs one hot adapter (target: no throughput loss);
5. adapter cold load from a directory, and (with --http) from the MLflow registry by
   models:/NAME@ALIAS through a real MLflow server (target p50 < 50 ms);
6. with --http: the same closed-loop load through the real Serve app over HTTP (16 and 32 clients,
   streaming, time to first chunk), on a local cluster this script starts and stops.

Writes bench/results/serving.json. `--duration` sets seconds per load point.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CARRYON_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from carryon_ray.adapter import save_adapter  # noqa: E402
from carryon_ray.base import FrozenBase  # noqa: E402
from carryon_ray.bridge import Bridge  # noqa: E402
from carryon_ray.config import BaseModelConfig, validate_config  # noqa: E402
from carryon_ray.engine import Engine, Request  # noqa: E402
from carryon_ray.generation import Adapter, generate_mixed  # noqa: E402
from carryon_ray.model import CarryOn  # noqa: E402

PROMPT = "Question: A farmer has 12 cows and buys 5 more. Then 3 cows are sold. How many cows are left?\nAnswer:"


def carryon(base, kind: str, seed: int, width: int) -> Adapter:
    cfg = validate_config({"data": {"train": "x"}, "carryon": {"kind": kind, "width": width, "layers": 2 if kind == "transformer" else 1,
                                                                "heads": 4, "kv_heads": 2, "gate": True}})
    torch.manual_seed(seed)
    m = CarryOn(cfg.carryon, cfg.head, [[base.hidden_size]], base.vocab_size, "average", base.head_weight, base.head_bias, 0.5)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return Adapter(m.eval(), [[Bridge(8)]], [], {})


def recycled(base, seed: int, depth: int = 8, rank: int = 8) -> Adapter:
    """A recycled-top adapter with random deltas on the base's top `depth` blocks (all seven linears)."""
    from carryon_ray.recycled import TARGET_PATHS, RecycledTop

    cfg = validate_config({"data": {"train": "x"}, "carryon": {"kind": "recycled", "depth": depth, "rank": rank}})
    top = base.model.model.layers[-1]
    shapes = {t: tuple(top.get_submodule(TARGET_PATHS[t]).weight.shape) for t in cfg.carryon.targets}
    torch.manual_seed(seed)
    m = RecycledTop(cfg.carryon, cfg.head, [[base.hidden_size]], base.vocab_size, base.num_layers, shapes,
                    base.head_weight, base.head_bias, 1.0)
    for p in m.deltas.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return Adapter(m.eval(), [[Bridge(0)]], [], {}).attach(base)


def decode_rate(base, adapters, prompts, new_tokens: int, repeats: int, temperature: float = 0.0) -> dict:
    """Median seconds and generated tokens/s of decoding `new_tokens` for every row, over `repeats`."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = generate_mixed(base, prompts, adapters, max_new_tokens=new_tokens, temperature=temperature,
                             seeds=list(range(len(prompts))), stop_at_eos=False)
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    n = sum(len(o) for o in out)
    return {"seconds": round(t, 4), "tokens_per_s": round(n / t, 2), "seconds_per_step": round(t / new_tokens, 5)}


# ---------------------------------------------------------------------------------------------
# Closed-loop load against a scheduler.
# ---------------------------------------------------------------------------------------------


class ContinuousScheduler:
    """The engine, stepped by one thread (what a replica runs), with the replica's engine settings.
    forward="flat": one forward per step (the engine's layer loop); "padded": the engine before it
    (a padded decode forward and a padded prefill forward when prompts arrive)."""

    def __init__(self, base, forward: str = "flat"):
        from serve.settings import EngineConfig

        cfg = EngineConfig()
        self.engine = Engine(base, max_rows=cfg.max_rows, prefill_tokens=cfg.prefill_tokens, forward=forward,
                             prefill_tokens_decoding=cfg.prefill_tokens_decoding)
        self.events: dict[int, threading.Event] = {}
        self.stamps: list[float] = []
        self.stop = False
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        while not self.stop:
            if not self.engine.has_work():
                time.sleep(0.0005)
                continue
            out = self.engine.step()
            now = time.monotonic()
            self.stamps.extend([now] * len(out.tokens))
            for seq in out.finished:
                self.events.pop(seq.id).set()

    def run(self, req: Request):
        ev = threading.Event()
        seq = self.engine.submit(req)
        self.events[seq.id] = ev
        ev.wait()
        return seq


class StaticScheduler:
    """Before the engine: batches cut from a 20 ms window (at most 16 rows), each run to its end
    before the next starts; requests arriving meanwhile wait."""

    def __init__(self, base, window_s: float = 0.02, max_batch: int = 16):
        self.base, self.window, self.max_batch = base, window_s, max_batch
        self.q: queue.Queue = queue.Queue()
        self.stamps: list[float] = []
        self.stop = False
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        while not self.stop:
            try:
                first = self.q.get(timeout=0.1)
            except queue.Empty:
                continue
            batch, t_end = [first], time.monotonic() + self.window
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.q.get(timeout=max(0.0, t_end - time.monotonic())))
                except queue.Empty:
                    break
            engine = Engine(self.base, max_rows=len(batch), prefill_tokens=1 << 20)
            seqs = [engine.submit(r) for r, _ in batch]
            while not all(s.done for s in seqs):
                out = engine.step()
                self.stamps.extend([time.monotonic()] * len(out.tokens))
            for (_, holder), seq in zip(batch, seqs):
                holder.append(seq)
                holder[0].set()

    def run(self, req: Request):
        holder = [threading.Event()]
        self.q.put((req, holder))
        holder[0].wait()
        return holder[1]


def closed_loop(sched, ids, adapters, clients: int, duration: float, seed: int = 0, probe: bool = True,
                warmup: float | None = None) -> dict:
    """`clients` threads send back to back for `duration` s (max_tokens 8..128, random adapter),
    plus an optional probe sending max_tokens=8. Throughput counts the tokens generated inside the
    window after a warm-up (every token is timestamped), so the ramp and the drain do not count."""
    records, probes, lock = [], [], threading.Lock()
    errors = [0]
    sched.stamps = stamps = []  # the scheduler's thread stamps every token it produces
    warmup = duration * 0.2 if warmup is None else warmup
    t_begin = time.monotonic()
    deadline = t_begin + warmup + duration

    def client(i: int, short: bool):
        rng = random.Random(seed * 1000 + i)
        while time.monotonic() < deadline:
            n = 8 if short else rng.randint(8, 128)
            t0 = time.monotonic()
            seq = sched.run(Request(ids, rng.choice(adapters), n, temperature=0.7, seed=rng.randrange(1 << 30),
                                    stop_at_eos=False))
            if seq.finish_reason == "error":
                with lock:
                    errors[0] += 1
            rec = (time.monotonic() - t0, (seq.first_token_at or t0) - seq.submitted, len(seq.tokens), t0)
            if t0 >= t_begin + warmup:  # latencies of requests sent after the warm-up
                with lock:
                    (probes if short else records).append(rec)

    threads = [threading.Thread(target=client, args=(i, False)) for i in range(clients)]
    if probe:
        threads.append(threading.Thread(target=client, args=(clients, True)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = sorted(r[0] for r in records)
    ttft = sorted(r[1] for r in records)
    q = lambda xs, p: round(xs[min(len(xs) - 1, int(p * len(xs)))], 4) if xs else None  # noqa: E731
    tokens = sum(t_begin + warmup <= s < deadline for s in stamps)
    out = {"clients": clients, "requests": len(records), "completion_tokens_per_s": round(tokens / duration, 2),
           "latency_p50_s": q(lat, 0.5), "latency_p99_s": q(lat, 0.99),
           "ttft_p50_s": q(ttft, 0.5), "ttft_p99_s": q(ttft, 0.99), "window_s": duration, "warmup_s": round(warmup, 1),
           "failed_requests": errors[0]}
    if probes:
        out["probe_p50_s"] = q(sorted(r[0] for r in probes), 0.5)
        out["probe_requests"] = len(probes)
    return out


def load_section(base, ids, adapters, duration: float, counts: list[int]) -> dict:
    solo = statistics.median([generate_once(base, ids, adapters[1], 8) for _ in range(5)])
    res: dict = {"solo_max_tokens_8_s": round(solo, 4)}
    factories = (("static", StaticScheduler), ("engine_padded", lambda b: ContinuousScheduler(b, "padded")),
                 ("engine", ContinuousScheduler))
    for name, factory in factories:
        sched = factory(base)
        res[name] = {}
        for c in counts:
            r = closed_loop(sched, ids, adapters, c, duration)
            r["probe_over_solo"] = round(r["probe_p50_s"] / solo, 2) if r.get("probe_p50_s") else None
            res[name][str(c)] = r
            print(name, json.dumps(r), flush=True)
        sched.stop = True
    # The reference: 16 rows decoded together to the same length (the mean of 8..128).
    ref = decode_rate(base, [adapters[i % len(adapters)] for i in range(16)], [ids] * 16, 68, 2, temperature=0.7)
    res["batch16_equal_lengths"] = ref
    for name, _ in factories:
        if "16" in res[name]:
            res[name]["16"]["vs_batch16"] = round(res[name]["16"]["completion_tokens_per_s"] / ref["tokens_per_s"], 3)
    return res


def mixed_rank_section(base, ids, adapters, duration: float, clients: int = 16) -> dict:
    """`clients` closed-loop clients spread over recycled adapters of mixed ranks (their lone decode
    rows share each step: one gathered matmul per rank and layer) against the same load on the bare
    base, through the replica's engine settings."""
    res: dict = {}
    for name, pool in (("base", [None]), ("recycled_mixed_ranks", adapters)):
        sched = ContinuousScheduler(base)
        res[name] = closed_loop(sched, ids, pool, clients, duration, probe=False)
        res[name]["steps_isolated_after_a_failure"] = sched.engine.stats.isolated
        sched.stop = True
        print(name, json.dumps(res[name]), flush=True)
    res["ratio_vs_base"] = round(res["recycled_mixed_ranks"]["completion_tokens_per_s"]
                                 / res["base"]["completion_tokens_per_s"], 3)
    res["ranks"] = [a.carryon.arch.rank for a in adapters]
    res["depth"] = adapters[0].carryon.arch.depth
    res["target"] = 0.8
    return res


def recycled_steps_section(base, ids, adapters, rows: int = 16, steps: int = 15) -> dict:
    """Decode step time alone (no arrivals): `rows` rows on the base vs the same rows spread over
    `adapters` (recycled, mixed ranks), the two engines stepped alternately so drift hits both."""
    engines = {}
    for name, pool in (("base", [None]), ("recycled_mixed_ranks", adapters)):
        e = Engine(base, max_rows=rows, prefill_tokens=1 << 20)
        for i in range(rows):
            e.submit(Request(ids, pool[i % len(pool)], 4 * steps + 8, stop_at_eos=False))
        while e.decoding < rows:
            e.step()
        e.step()
        engines[name] = e
    times = {k: [] for k in engines}
    for _ in range(steps):
        for k, e in engines.items():
            t0 = time.perf_counter()
            e.step()
            times[k].append(time.perf_counter() - t0)
    res = {k: {"step_ms_median": round(statistics.median(v) * 1000, 1)} for k, v in times.items()}
    res["step_time_ratio"] = round(res["recycled_mixed_ranks"]["step_ms_median"] / res["base"]["step_ms_median"], 3)
    res["rows"], res["adapters"], res["steps"] = rows, len(adapters), steps
    return res


def long_prompt_section(base, ids, rows: int = 16, prompt_tokens: int = 1000) -> dict:
    """16 rows decode; a 1,000-token prompt arrives. Inter-token latency of the decoding rows (seconds
    per step) while its prompt is prefilled, against the steps before it arrived, per forward mode."""
    from serve.settings import EngineConfig

    cfg = EngineConfig()
    long = (ids * (prompt_tokens // len(ids) + 1))[:prompt_tokens]
    res = {"decoding_rows": rows, "prompt_tokens": prompt_tokens, "prefill_tokens": cfg.prefill_tokens,
           "prefill_tokens_decoding": cfg.prefill_tokens_decoding}
    modes = {"padded": ("padded", None), "flat_one_budget": ("flat", None), "flat": ("flat", cfg.prefill_tokens_decoding)}
    for name, (forward, while_decoding) in modes.items():
        engine = Engine(base, max_rows=cfg.max_rows, prefill_tokens=cfg.prefill_tokens, forward=forward,
                        prefill_tokens_decoding=while_decoding)
        for _ in range(rows):
            engine.submit(Request(ids, None, 400, stop_at_eos=False))
        while engine.decoding < rows:
            engine.step()

        def timed(n):
            out = []
            for _ in range(n):
                t0 = time.perf_counter()
                engine.step()
                out.append(time.perf_counter() - t0)
            return out

        timed(3)  # warm
        before = statistics.median(timed(10))
        seq = engine.submit(Request(long, None, 1, stop_at_eos=False))
        during = []
        while not seq.done:
            during += timed(1)
        res[name] = {"itl_before_s": round(before, 4), "ttft_s": round(sum(during), 3), "itl_during_prefill_s": round(statistics.mean(during), 4),
                        "itl_during_prefill_max_s": round(max(during), 4), "prefill_steps": len(during),
                        "itl_ratio": round(statistics.mean(during) / before, 3), "base_forwards": engine.stats.forwards,
                        "steps": engine.stats.steps}
        print(json.dumps({"long_prompt": {name: res[name]}}), flush=True)
    res["target_itl_ratio"] = 2.0
    return res


def generate_once(base, ids, adapter, n: int) -> float:
    t0 = time.perf_counter()
    generate_mixed(base, [ids], [adapter], max_new_tokens=n, stop_at_eos=False)
    return time.perf_counter() - t0


def lru_section(base, ids, directory: Path, duration: float, n_adapters: int, slots: int = 32, clients: int = 16) -> dict:
    """Many adapters through a small LRU (cold loads on misses) vs one hot adapter, same load."""
    fp = [base.fingerprint().to_dict()]
    template = carryon(base, "mlp", 7, 64)
    t0 = time.perf_counter()
    for i in range(n_adapters):
        torch.manual_seed(i)
        for p in template.carryon.parameters():
            torch.nn.init.normal_(p, std=0.02)
        save_adapter(directory / f"u{i}", template.carryon, template.bridges, [], fp, "smollm2")
    write_s = time.perf_counter() - t0
    lock = threading.Lock()
    lru: OrderedDict = OrderedDict()
    misses = [0]

    def get(i: int) -> Adapter:
        with lock:
            if i in lru:
                lru.move_to_end(i)
                return lru[i]
        a = Adapter.load(base, directory / f"u{i}")  # outside the lock, as Serve loads in a thread
        with lock:
            misses[0] += 1
            lru[i] = a
            while len(lru) > slots:
                lru.popitem(last=False)
        return a

    class Cycling(ContinuousScheduler):
        def __init__(self, base, pick):
            super().__init__(base)
            self.pick = pick

        def run(self, req):
            req.adapter = get(self.pick())
            return super().run(req)

    rng = random.Random(0)
    out = {"adapters": n_adapters, "lru_slots": slots, "clients": clients, "write_s": round(write_s, 1)}
    for name, pick in (("one_hot_adapter", lambda: 0), ("cycling", lambda: rng.randrange(n_adapters))):
        sched = Cycling(base, pick)
        out[name] = closed_loop(sched, ids, [None], clients, duration, probe=False)
        sched.stop = True
        print(name, json.dumps(out[name]), flush=True)
    out["lru_misses"] = misses[0]
    out["throughput_ratio"] = round(out["cycling"]["completion_tokens_per_s"] /
                                    out["one_hot_adapter"]["completion_tokens_per_s"], 3)
    return out


def http_section(base, ids, adapters, duration: float, counts: list[int], tmp: Path) -> dict:
    """The real Serve app over HTTP on a local cluster, and cold loads from the MLflow registry."""
    import subprocess

    import httpx
    import yaml

    from jobs import local_cluster

    fp = [base.fingerprint().to_dict()]
    names = []
    for i, a in enumerate(adapters):
        if a is None:
            continue
        save_adapter(tmp / f"ad{i}", a.carryon, a.bridges, [], fp, "smollm2")
        names.append(f"user{i}")
    keys = tmp / "keys.yaml"
    keys.write_text("bench-key: bench\n")
    cfg = {"base": {"name": "smollm2-135m-instruct", "dtype": "float32"},
           "adapters": [{"name": n, "source": str(tmp / f"ad{n[4:]}"), "shared": True} for n in names],
           "auth": {"keys_file": str(keys), "admins": ["bench"]}, "limits": {"max_tokens": 128,
                                                                            "max_concurrent_per_key": 64},
           "engine": {"max_rows": 32, "prefill_tokens": 256}, "replicas": {"num_cpus": 1, "max_adapters": 32}}
    (tmp / "serve.yaml").write_text(yaml.safe_dump(cfg))
    state_dir = tmp / "cluster"
    state = local_cluster.up(str(state_dir), num_cpus=2)
    res: dict = {}
    try:
        # cold load from the registry: register one adapter, load it by alias repeatedly (fresh download each time)
        from mlflow.tracking import MlflowClient

        os.environ["MLFLOW_TRACKING_URI"] = state["mlflow_url"]
        client = MlflowClient(state["mlflow_url"])
        run = client.create_run(client.create_experiment("bench-serving"))
        client.log_artifacts(run.info.run_id, str(tmp / "ad1"), "adapter")
        client.create_registered_model("bench-adapter")
        mv = client.create_model_version("bench-adapter", f"{run.info.artifact_uri}/adapter", run.info.run_id)
        client.set_registered_model_alias("bench-adapter", "current", mv.version)
        client.set_terminated(run.info.run_id)
        Adapter.load(base, "models:/bench-adapter@current")
        loads = []
        for _ in range(10):
            t0 = time.perf_counter()
            Adapter.load(base, "models:/bench-adapter@current")
            loads.append((time.perf_counter() - t0) * 1000)
        res["registry_cold_load_ms"] = {"p50": round(statistics.median(loads), 2), "max": round(max(loads), 2)}
        print("registry", json.dumps(res["registry_cold_load_ms"]), flush=True)

        port = local_cluster.free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        served = subprocess.run([sys.executable, "-m", "carryon_cli", "serve", str(tmp / "serve.yaml"), "--state-dir",
                                 str(state_dir), "--port", str(port)], capture_output=True, text=True, env=env,
                                timeout=900, cwd=ROOT)
        if served.returncode:
            raise RuntimeError(served.stderr[-2000:])
        url = f"http://127.0.0.1:{port}/v1/completions"
        models = names + ["smollm2-135m-instruct"]

        def probe_once(http) -> float:
            t0 = time.monotonic()
            r = http.post(url, headers={"Authorization": "Bearer bench-key"}, json={
                "model": models[1], "prompt": PROMPT, "max_tokens": 8, "temperature": 0.7, "ignore_eos": True})
            r.raise_for_status()
            return time.monotonic() - t0

        def http_load(clients: int) -> dict:
            recs, probes, lock = [], [], threading.Lock()
            deadline = time.monotonic() + duration

            def probe():  # a max_tokens=8 request, back to back, under the load
                with httpx.Client(timeout=600) as http:
                    time.sleep(duration * 0.2)
                    while time.monotonic() < deadline:
                        probes.append(probe_once(http))

            def one(i):
                rng = random.Random(i)
                with httpx.Client(timeout=600) as http:
                    while time.monotonic() < deadline:
                        n = rng.randint(8, 128)
                        t0 = time.monotonic()
                        first, toks = None, 0
                        with http.stream("POST", url, headers={"Authorization": "Bearer bench-key"},
                                         json={"model": rng.choice(models), "prompt": PROMPT, "max_tokens": n,
                                               "temperature": 0.7, "ignore_eos": True, "stream": True,
                                               "stream_options": {"include_usage": True}}) as r:
                            for line in r.iter_lines():
                                if first is None and line.startswith("data: {"):
                                    first = time.monotonic() - t0
                                if '"usage"' in line and '"completion_tokens"' in line:
                                    toks = json.loads(line[6:])["usage"]["completion_tokens"]
                        with lock:
                            recs.append((time.monotonic() - t0, first or 0.0, toks, r.status_code))

            threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
            threads.append(threading.Thread(target=probe))
            t_start = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.monotonic() - t_start
            lat, ttft = sorted(r[0] for r in recs), sorted(r[1] for r in recs)
            q = lambda xs, p: round(xs[min(len(xs) - 1, int(p * len(xs)))], 3) if xs else None  # noqa: E731
            return {"clients": clients, "requests": len(recs), "errors": sum(r[3] != 200 for r in recs),
                    "completion_tokens_per_s": round(sum(r[2] for r in recs) / wall, 2),
                    "requests_per_s": round(len(recs) / wall, 3), "latency_p50_s": q(lat, 0.5),
                    "latency_p99_s": q(lat, 0.99), "ttft_p50_s": q(ttft, 0.5), "ttft_p99_s": q(ttft, 0.99),
                    "probe_p50_s": q(sorted(probes), 0.5), "probe_requests": len(probes),
                    "probe_over_solo": round(q(sorted(probes), 0.5) / res["http_solo_max_tokens_8_s"], 2) if probes else None}

        httpx.post(url, headers={"Authorization": "Bearer bench-key"},
                   json={"model": names[0], "prompt": PROMPT, "max_tokens": 4}, timeout=300)  # warm the replica
        with httpx.Client(timeout=600) as http:
            probe_once(http)
            res["http_solo_max_tokens_8_s"] = round(statistics.median(probe_once(http) for _ in range(5)), 4)
        for c in counts:
            res[f"http_{c}"] = http_load(c)
            print("http", json.dumps(res[f"http_{c}"]), flush=True)
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        local_cluster.down(str(state_dir))
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per closed-loop load point")
    p.add_argument("--clients", default="1,4,16,32", help="client counts of the in-process load")
    p.add_argument("--lru-adapters", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--http", action="store_true", help="also load the real Serve app over HTTP (and the registry)")
    p.add_argument("--http-clients", default="16,32")
    p.add_argument("--sections", default="batch,mixed64,recycled64,recycled_mixed,long_prompt,load,registry",
                   help="which sections to run (comma-separated; --http adds the HTTP one)")
    p.add_argument("--out", default=str(ROOT / "bench/results/serving.json"))
    args = p.parse_args()
    sections = set(args.sections.split(","))
    torch.manual_seed(0)
    base = FrozenBase.load(BaseModelConfig(name=args.base, dtype="float32"))
    ids = base.tokenizer(PROMPT)["input_ids"]
    res: dict = {"device": str(base.device), "threads": torch.get_num_threads(), "config": vars(args)}

    # 1. overhead per token, batch 1 and batch 16 on one adapter
    mlp, tfm = carryon(base, "mlp", 0, 64), carryon(base, "transformer", 1, 128)
    for batch in (1, 16) if "batch" in sections else ():
        prompts = [ids] * batch
        b = decode_rate(base, [None] * batch, prompts, 24, args.repeats)
        m = decode_rate(base, [mlp] * batch, prompts, 24, args.repeats)
        t = decode_rate(base, [tfm] * batch, prompts, 24, args.repeats)
        res[f"batch{batch}"] = {"base": b, "mlp": m, "transformer": t,
                                "mlp_overhead": round(m["seconds"] / b["seconds"] - 1, 4),
                                "transformer_overhead": round(t["seconds"] / b["seconds"] - 1, 4)}
        print(json.dumps({f"batch{batch}": res[f"batch{batch}"]}), flush=True)

    # 2. 64 rows over 64 distinct adapters vs 64 rows on one adapter
    distinct = [carryon(base, "mlp", 100 + i, 64) for i in range(64)]
    if "mixed64" in sections:
        one = decode_rate(base, [mlp] * 64, [ids] * 64, 16, args.repeats)
        many = decode_rate(base, distinct, [ids] * 64, 16, args.repeats)
        res["mixed64"] = {"one_adapter": one, "sixty_four_adapters": many,
                          "throughput_ratio": round(many["tokens_per_s"] / one["tokens_per_s"], 4), "target": 0.95}
        print(json.dumps({"mixed64": res["mixed64"]}), flush=True)

    # 2b. 64 rows over 64 distinct recycled-top adapters (top 8 blocks, rank 8, all seven linears) vs the
    # base alone: the deltas bound per row inside the base's forward, one gathered matmul per layer
    if "recycled64" in sections:
        rec = [recycled(base, 300 + i) for i in range(64)]
        bare = decode_rate(base, [None] * 64, [ids] * 64, 16, args.repeats)
        one_rec = decode_rate(base, [rec[0]] * 64, [ids] * 64, 16, args.repeats)
        many_rec = decode_rate(base, rec, [ids] * 64, 16, args.repeats)
        res["recycled64"] = {"base": bare, "one_recycled_adapter": one_rec, "sixty_four_recycled_adapters": many_rec,
                             "throughput_ratio_vs_base": round(many_rec["tokens_per_s"] / bare["tokens_per_s"], 4),
                             "one_adapter_ratio_vs_base": round(one_rec["tokens_per_s"] / bare["tokens_per_s"], 4),
                             "depth": 8, "rank": 8, "target": 0.8}
        print(json.dumps({"recycled64": res["recycled64"]}), flush=True)

    # 2c. 16 clients over 8 recycled adapters of ranks 4/8/16/32 (top 8 blocks) vs the same load on the base
    if {"recycled_mixed", "recycled_steps"} & sections:
        mixed = [recycled(base, 400 + i, rank=r) for i, r in enumerate([4, 8, 16, 32] * 2)]
    if "recycled_mixed" in sections:
        res["recycled_mixed"] = mixed_rank_section(base, ids, mixed, args.duration)
    if "recycled_steps" in sections:
        res["recycled_steps"] = recycled_steps_section(base, ids, mixed)
        print(json.dumps({"recycled_steps": res["recycled_steps"]}), flush=True)

    # 3. closed-loop load: static batching vs the engine
    adapters = [None] + [carryon(base, "mlp" if i % 2 else "transformer", 200 + i, 64) for i in range(8)]
    if "long_prompt" in sections:
        res["long_prompt"] = long_prompt_section(base, ids)
    if "load" in sections:
        res["load"] = load_section(base, ids, adapters, args.duration, [int(c) for c in args.clients.split(",")])

    with tempfile.TemporaryDirectory() as d:
        if "registry" in sections:
            # 5a. cold load from a directory
            loads = []
            fp = [base.fingerprint().to_dict()]
            for i, a in enumerate(distinct[:16]):
                save_adapter(Path(d) / f"a{i}", a.carryon, a.bridges, [], fp, "smollm2")
            Adapter.load(base, Path(d) / "a0")  # warm the code path once
            for i in range(16):
                t0 = time.perf_counter()
                Adapter.load(base, Path(d) / f"a{i}")
                loads.append((time.perf_counter() - t0) * 1000)
            size = sum(f.stat().st_size for f in (Path(d) / "a0").iterdir())
            res["cold_load_ms"] = {"p50": round(statistics.median(loads), 2), "max": round(max(loads), 2),
                                   "adapter_bytes": size}
            print(json.dumps({"cold_load_ms": res["cold_load_ms"]}), flush=True)
            # 4. many adapters through a 32-slot LRU
            lru_dir = Path(d) / "lru"
            lru_dir.mkdir()
            res["lru"] = lru_section(base, ids, lru_dir, args.duration, args.lru_adapters)
        # 6. HTTP and the registry
        if args.http:
            http_dir = Path(d) / "http"
            http_dir.mkdir()
            res["http"] = http_section(base, ids, adapters, args.duration, [int(c) for c in args.http_clients.split(",")],
                                       http_dir)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
