"""Fine-tuning as a service (issue 32): seconds from `fine_tuning.jobs.create` to the first
streamed token of its fine_tuned_model, beside the Ray job path's wall for the same rows.

On one fresh local cluster (`carryon up`, all of this machine's CPUs) this script:
  1. deploys `carryon serve serve/local.yaml` (the real SmolLM2, the fine-tuning API on),
  2. uploads the demo's rows (built-in topics, 240) with the official openai client, creates a job
     with the service's defaults (the demo's carry-on: gated MLP, width 64, 3 epochs), polls it, and
     streams a completion from its fine_tuned_model: create -> first token is the figure;
  3. scores the new model and the base on 40 held-out prompts through the API;
  4. (full size) stops Serve and runs the same rows as today's Ray job, `carryon customize
     configs/demo.yaml` (no held-out pass, so both do the same work), timing submission -> exit.
  5. (full size) the same job again with the service told to run each job's base forward in the
     job's own process (`finetune.producers=job`, the behaviour before jobs
     co-served): the job process's peak memory and create -> first token, beside the co-serving run.
Writes bench/results/finetune-api.json (`create_to_first_token_s`, `job_path_wall_s` and their
ratio; `job_peak_rss_mb` and `own_base.job_peak_rss_mb`, sampled from the job's actor process).
Run alone: the machine is shared by every process it starts.

    python bench/finetune_api.py [--quick] [--out FILE]
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


def carryon(*args, env=None, timeout=1800) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "carryon_cli", *args], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=timeout)
    return res, time.perf_counter() - t0


class PeakRss(threading.Thread):
    """Peak resident memory of the fine-tuning jobs' actor processes and of the model replica,
    sampled twice a second (their pids from Ray's state API)."""

    def __init__(self, address: str):
        super().__init__(daemon=True)
        self.address, self.peak, self.stop_flag = address, {"job": 0, "replica": 0}, threading.Event()

    def run(self) -> None:
        import psutil
        from ray.util.state import list_actors

        pids: dict[int, str] = {}
        last_look = 0.0
        while not self.stop_flag.is_set():
            if time.monotonic() - last_look > 2:
                last_look = time.monotonic()
                try:
                    for a in list_actors(address=self.address, filters=[("state", "=", "ALIVE")], limit=10_000,
                                         raise_on_missing_output=False):
                        if a.class_name == "FinetuneJob" or a.class_name.endswith(":ModelServer"):
                            pids[a.pid] = "job" if a.class_name == "FinetuneJob" else "replica"
                except Exception:  # noqa: BLE001 - a missed look is not a result
                    pass
            for pid, kind in list(pids.items()):
                try:
                    self.peak[kind] = max(self.peak[kind], psutil.Process(pid).memory_info().rss)
                except psutil.Error:
                    pids.pop(pid)
            self.stop_flag.wait(0.5)

    def result(self) -> dict:
        self.stop_flag.set()
        self.join(5)
        return {"job_peak_rss_mb": round(self.peak["job"] / 2**20), "replica_peak_rss_mb": round(self.peak["replica"] / 2**20)}


def run_job(client, base: str, file_id: str, address: str) -> dict:
    """Create a job, wait for it, stream the first completion of its model: the timings and the
    job process's peak memory."""
    sampler = PeakRss(address)
    sampler.start()
    t0 = time.perf_counter()
    job = client.fine_tuning.jobs.create(model=base, training_file=file_id, suffix="topics", seed=0)
    while job.status not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.5)
        job = client.fine_tuning.jobs.retrieve(job.id)
    t_done = time.perf_counter() - t0
    assert job.status == "succeeded", job.error
    stream = client.completions.create(model=job.fine_tuned_model, prompt="Sentence: Heavy rain flooded "
                                       "the harbor.\nTopic:", max_tokens=4, temperature=0, stream=True)
    first = None
    text = ""
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter() - t0
        text += chunk.choices[0].text if chunk.choices else ""
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=10000))
    record = client.get(f"/fine_tuning/jobs/{job.id}", cast_to=object)
    return {"create_to_first_token_s": round(first, 1), "create_to_succeeded_s": round(t_done, 1),
            "first_answer": text, "fine_tuned_model": job.fine_tuned_model, "trained_tokens": job.trained_tokens,
            "job_result": record["carryon"]["result"], **sampler.result(),
            "messages": [e.message for e in reversed(events) if e.type == "message"]}


def main() -> None:
    from openai import OpenAI

    from carryon_ray.data import topic_rows
    from jobs import local_cluster

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="80 rows, neither baseline (own-base job, Ray job path)")
    p.add_argument("--out", default=str(ROOT / "bench/results/finetune-api.json"))
    args = p.parse_args()
    rows = 80 if args.quick else 240
    out: dict = {"rows": rows, "machine": {"cpus": os.cpu_count()}, "quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="bench-ft-") as tmp:
        state_dir = f"{tmp}/cluster"
        state = local_cluster.up(state_dir, num_cpus=os.cpu_count())
        try:
            key = "bench-key"
            (Path(tmp) / "keys.yaml").write_text(f"{key}: demo\n")
            port = local_cluster.free_port()
            res, serve_s = carryon("serve", "serve/local.yaml", "--set", f"auth.keys_file={tmp}/keys.yaml",
                                   "--state-dir", state_dir, "--port", str(port))
            assert res.returncode == 0, res.stderr[-3000:]
            out["serve_start_s"] = round(serve_s, 1)
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=600)
            base = client.models.list().data[0].id
            data = "".join(json.dumps(r) + "\n" for r in topic_rows(rows, seed=0)).encode()
            f = client.files.create(file=("topics.jsonl", data), purpose="fine-tune")
            os.environ.update(local_cluster.client_env(state))  # the state API's calls (PeakRss)
            out.update(run_job(client, base, f.id, state["ray_address"]))
            heldout = topic_rows(40, seed=0, split="heldout")
            for name, model in (("base", base), ("fine_tuned", out["fine_tuned_model"])):
                right = 0
                for i in range(0, len(heldout), 8):
                    group = heldout[i:i + 8]
                    r = client.completions.create(model=model, prompt=[g["prompt"] for g in group], max_tokens=4,
                                                  temperature=0)
                    for choice in r.choices:
                        right += choice.text.strip().lower().startswith(group[choice.index]["completion"].strip())
                out[f"heldout_accuracy_{name}"] = right / len(heldout)
            if not args.quick:  # each job's base forward in its own process, as before jobs co-served
                res, _ = carryon("serve", "serve/local.yaml", "--set", f"auth.keys_file={tmp}/keys.yaml",
                                 "--set", "finetune.producers=job", "--state-dir", state_dir,
                                 "--port", str(port))
                assert res.returncode == 0, res.stderr[-3000:]
                own = run_job(client, base, f.id, state["ray_address"])
                out["own_base"] = {k: v for k, v in own.items() if k != "messages"}
                out["own_base"]["said"] = next(m for m in own["messages"] if m.startswith("Base forward"))
                out["job_peak_rss_over_own_base"] = round(out["job_peak_rss_mb"] / own["job_peak_rss_mb"], 3)
            if not args.quick:  # today's path for the same rows, on the same cluster with Serve stopped
                carryon("serve", "--stop", "--state-dir", state_dir)
                res, wall = carryon("customize", "configs/demo.yaml", "--state-dir", state_dir,
                                    "--set", f"output.dir={tmp}/job", "--set", "eval.heldout=null",
                                    "--set", "data.general_val=null", "--set", "mlflow.register_as=bench-topics")
                assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
                line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))
                out.update({"job_path_wall_s": round(wall, 1),
                            "job_path_job_wall_s": json.loads(line[len("RESULT "):])["wall_seconds"],
                            "create_to_first_token_over_job_path": round(out["create_to_first_token_s"] / wall, 3)})
        finally:
            local_cluster.down(state_dir)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "messages"}, indent=2))


if __name__ == "__main__":
    main()
