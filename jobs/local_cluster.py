"""`carryon up` / `carryon down`: a local Ray head plus a local MLflow server, started and stopped
by their own process groups.

The head advertises both node classes (the custom resources the inference-class and
training-class node types carry in cluster.yaml), so the same job runs on one machine. `down`
stops exactly the processes `up` started (never `ray stop`, which kills every Ray cluster on the
machine). Addresses and process ids are recorded in <state_dir>/cluster.json.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_STATE = ".carryon"
# How long the head's dashboard and the MLflow server may take to answer. Alone they start in
# seconds; on a loaded 2-core machine MLflow's server once took about 2 min (a 120 s limit failed a
# CI run's job tests at their cluster fixture).
START_TIMEOUT_S = 300


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports: each socket stays bound until all are picked (one at a time, the
    OS may hand the same port out twice: a head once got its dashboard on the GCS's port)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _bin(name: str) -> str:
    """The console script next to this interpreter (the venv's ray / mlflow)."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def _wait_http(url: str, timeout: float, proc: subprocess.Popen, what: str, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:  # it answers (401/403 when Ray token auth is on)
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer at {url} within {timeout:.0f}s; see {log}")


# One machine is never drained or preempted, so Ray Train's preemption watcher has nothing to
# watch; off, it also stops Ray core logging its creation as an error line on every job (its
# constructor takes actor handles: ray-project/ray#53727). Clusters keep it (cluster.yaml). Read by
# Ray Train's controller, a worker: it travels in the job's runtime env.
SINGLE_MACHINE_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

# The raylet's settings for a one-machine cluster (Ray's system config: `ray start --system-config`,
# `ray.init(_system_config=...)`; a cluster's other nodes read it from the head).
#
# worker_maximum_startup_concurrency: Ray starts at most as many worker processes at once as the
# node has CPUs, and prints "N PYTHON worker processes have been started ... 4x the maximum expected
# startup concurrency" once 4x that many are alive. One job here is ~12 processes, most of them
# zero-CPU coordinators that idle (Ray Train's controller, sync actor, placement-group cleaner and
# dataset manager, Ray Data's split coordinator and stats actor, the producer service, the cache), so
# a 2-CPU laptop's demo printed it. With eight concurrent starts a tiny job's wall was unchanged (76,
# 77, 86 s with 8; 78, 79 s without, runs alternating) and the warning speaks only past 32.
#
# Not set: idle_worker_killing_time_threshold_ms. A node running more workers than it has CPUs
# (always, with those coordinators) kills a task worker idle for 1 s, so a tiny job's Ray Data stages
# start 5-6 task processes that each import transformers and torch. Kept for 60 s, one process fewer
# started, and the job's wall and CPU were unchanged (101.0 s, 143 busy CPU-s against 101.7 s, 145;
# two alternating rounds, bench/results/job-cpu-worker-reuse.json): Ray Data runs its tasks side by
# side, so the processes are concurrent, not churned.
SINGLE_MACHINE_RAYLET = {"worker_maximum_startup_concurrency": 8}

# MLflow's server also starts a job runner for its own server-side jobs (GenAI prompt optimization,
# trace roll-ups): a runner and a pool of huey consumer processes, each importing MLflow. Tracking and
# the model registry, all this project uses, never call it. Off, `up` on the 2-core machine leaves 2
# MLflow processes instead of 10 and spends 26 CPU-seconds instead of 34 (medians of two alternating
# rounds; bench/results/local-cluster-start.json).
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def up(state_dir: str = DEFAULT_STATE, inference_resource: str = "inference_node", training_resource: str = "training_node",
       node_class_units: int = 100, num_cpus: int | None = None, ray_port: int | None = None,
       dashboard_port: int | None = None, mlflow_port: int | None = None, with_mlflow: bool = True,
       raylet: dict | None = None) -> dict:
    """Start the head (and MLflow); return the recorded state. `raylet` overrides entries of
    SINGLE_MACHINE_RAYLET (a benchmark's A/B)."""
    state_path = Path(state_dir).resolve()
    state_path.mkdir(parents=True, exist_ok=True)
    if (state_path / "cluster.json").exists():
        state = json.loads((state_path / "cluster.json").read_text())
        if _alive(state.get("ray_pid")):
            raise RuntimeError(f"a carryon cluster is already running (see {state_path / 'cluster.json'}); run `carryon down` first")
    picked = iter(free_ports(6))  # the head's, the dashboard's and the agents' ports, all distinct
    ray_port, dashboard_port = ray_port or next(picked), dashboard_port or next(picked)
    # Ray's socket paths must stay short: keep its temp dir under /tmp, recorded for cleanup.
    temp_dir = tempfile.mkdtemp(prefix="carryon-ray-")
    resources = {inference_resource: node_class_units, training_resource: node_class_units}
    cmd = [_bin("ray"), "start", "--head", "--block", f"--port={ray_port}", f"--dashboard-port={dashboard_port}",
           "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--temp-dir={temp_dir}",
           f"--resources={json.dumps(resources)}", "--disable-usage-stats",
           # Ray's fixed defaults for the agents' ports (52365 for the job agent's HTTP server, ...)
           # collide with any other Ray instance on the machine: the job agent then never comes up.
           f"--dashboard-agent-listen-port={next(picked)}", f"--dashboard-agent-grpc-port={next(picked)}",
           f"--runtime-env-agent-port={next(picked)}", f"--metrics-export-port={next(picked)}",
           f"--system-config={json.dumps({**SINGLE_MACHINE_RAYLET, **(raylet or {})})}"]
    if num_cpus:
        cmd.append(f"--num-cpus={num_cpus}")
    ray_log = state_path / "ray-head.log"
    # `ray start` with token auth refuses to run without a token; a fresh machine has none yet.
    subprocess.run([_bin("ray"), "get-auth-token", "--generate"], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True)
    # Token auth on (Ray's default for new local clusters since 2.59, made explicit): clients on this
    # machine read the token from ~/.ray/auth_token and need RAY_AUTH_MODE=token (see client_env).
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", **SINGLE_MACHINE_ENV}
    # Job entrypoints run `python ...`: make that this interpreter (the venv with the project).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    ray_proc = subprocess.Popen(cmd, stdout=ray_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
    state = {"ray_pid": ray_proc.pid, "ray_address": f"127.0.0.1:{ray_port}",
             "dashboard_url": f"http://127.0.0.1:{dashboard_port}", "ray_temp_dir": temp_dir,
             "resources": resources, "state_dir": str(state_path), "auth_mode": "token"}
    (state_path / "cluster.json").write_text(json.dumps(state, indent=2))
    try:
        _wait_http(f"{state['dashboard_url']}/api/version", START_TIMEOUT_S, ray_proc, "ray head", ray_log)
        _wait_job_agent(state, env, ray_proc, ray_log)
        if with_mlflow:
            mlflow_port = mlflow_port or free_port()
            ml_log = state_path / "mlflow.log"
            ml_cmd = [_bin("mlflow"), "server", "--backend-store-uri", f"sqlite:///{state_path / 'mlflow.db'}",
                      "--artifacts-destination", str(state_path / "mlartifacts"), "--host", "127.0.0.1",
                      "--port", str(mlflow_port), "--workers", "1"]
            ml_proc = subprocess.Popen(ml_cmd, stdout=ml_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                                       env={**env, **MLFLOW_SERVER_ENV})
            state.update({"mlflow_pid": ml_proc.pid, "mlflow_url": f"http://127.0.0.1:{mlflow_port}"})
            (state_path / "cluster.json").write_text(json.dumps(state, indent=2))
            _wait_http(f"{state['mlflow_url']}/health", START_TIMEOUT_S, ml_proc, "mlflow server", ml_log)
    except BaseException:
        down(state_dir)
        raise
    return state


def _wait_job_agent(state: dict, env: dict, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """The dashboard answers before its job agent is registered; a submission in that window fails
    with 'No available agent'. Submit a no-op job until one is accepted, so `up` returns a cluster
    that takes jobs."""
    deadline = time.time() + timeout
    cmd = [_bin("ray"), "job", "submit", "--address", state["dashboard_url"], "--no-wait",
           "--submission-id", f"carryon-up-ready-{int(time.time())}", "--", "true"]
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray head exited with status {proc.returncode}; see {log}")
        if subprocess.run(cmd, env=env, capture_output=True, timeout=120).returncode == 0:
            return
        time.sleep(1.0)
    raise RuntimeError(f"the Ray job agent did not come up within {timeout:.0f}s; see {log}")


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _stop_group(pid: int | None, timeout: float = 20.0) -> None:
    """SIGTERM the process group `pid` leads (its own session), then SIGKILL what is left."""
    if not pid:
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except OSError:
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:  # reap the leader when this process started it, or it lingers as a zombie (still "alive")
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        try:
            os.killpg(pid, 0)
        except OSError:
            return
        time.sleep(0.3)
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def _stragglers(temp_dir: str) -> list[int]:
    """Live processes whose command line names this cluster's own temp dir (ours by construction)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if temp_dir in (proc / "cmdline").read_bytes().decode(errors="ignore"):
                if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":  # zombies are already dead
                    pids.append(int(proc.name))
        except (OSError, IndexError):
            continue
    return pids


def down(state_dir: str = DEFAULT_STATE) -> bool:
    """Stop the processes recorded by `up`; returns False when nothing was recorded."""
    path = Path(state_dir).resolve() / "cluster.json"
    if not path.exists():
        return False
    state = json.loads(path.read_text())
    _stop_group(state.get("mlflow_pid"))
    # `ray start --block` answers SIGTERM by stopping its raylet and dashboard within a second or
    # two and then waiting on the GCS, which does not exit (measured: still up 20 s later), so
    # the group gets 5 s before SIGKILL; stragglers naming our temp dir are killed below.
    _stop_group(state.get("ray_pid"), timeout=5.0)
    temp_dir = state.get("ray_temp_dir")
    if temp_dir and temp_dir.startswith(tempfile.gettempdir()):
        # Some Ray helpers start their own sessions; they still name our temp dir on their
        # command line, which makes them ours to stop.
        deadline = time.time() + 15
        while (left := _stragglers(temp_dir)) and time.time() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.3)
    path.unlink()
    return True


def is_running(state: dict) -> bool:
    return _alive(state.get("ray_pid")) and (not state.get("mlflow_pid") or _alive(state.get("mlflow_pid")))


def client_env(state: dict) -> dict[str, str]:
    """Environment a client needs to talk to a recorded cluster."""
    return {"RAY_AUTH_MODE": state["auth_mode"]} if state.get("auth_mode") else {}


def status(state_dir: str = DEFAULT_STATE) -> dict | None:
    path = Path(state_dir).resolve() / "cluster.json"
    return json.loads(path.read_text()) if path.exists() else None
