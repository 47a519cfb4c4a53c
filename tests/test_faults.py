"""Faults on a real local cluster: an embedding actor or a training worker killed mid-run.
(Node loss and Train growing onto a new node are in test_multinode.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT
from test_job import TINY_CONFIG, client_env, cluster  # noqa: F401  (module-scoped cluster fixture)

pytestmark = pytest.mark.slow


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _actor_pids(state: dict, title: str) -> list[int]:
    """PIDs of live Ray workers whose process title contains `title` and that descend from this
    test cluster's raylet (found by its own temp dir): nothing outside our cluster is touched."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if not _cmdline(pid).startswith("ray::") or title not in _cmdline(pid):
            continue
        parent, ours = pid, False
        for _ in range(4):
            parent = _ppid(parent)
            if parent <= 1:
                break
            if state["ray_temp_dir"] in _cmdline(parent):
                ours = True
                break
        if ours:
            pids.append(pid)
    return pids


def _start_job(cluster, tiny_dir, out: Path, *sets) -> subprocess.Popen:  # noqa: F811
    cmd = [sys.executable, "-u", "-m", "jobs.customize", "--config", TINY_CONFIG, "--set", f"base.name={tiny_dir}",
           "--set", f"output.dir={out}", *sets]
    env = {**client_env(cluster), "RAY_ADDRESS": cluster["ray_address"], "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)


def _watch(proc: subprocess.Popen, lines: list[str], trigger: str, action) -> threading.Thread:
    """Collect the job's output; call `action()` once when a line contains `trigger`."""

    def run():
        fired = False
        for line in proc.stdout:
            lines.append(line)
            if not fired and trigger in line:
                fired = True
                threading.Thread(target=action, daemon=True).start()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_killed_embedding_actor_loses_and_duplicates_nothing(cluster, tiny_dir, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    proc = _start_job(cluster, tiny_dir, out, "--set", "data.builtin_size=320", "--set", "resources.embed_batch_size=2",
                      "--set", "train.epochs=1", "--set", "resources.embed_actors_max=2")
    killed: list[tuple[int, float]] = []

    def kill_one():
        time.sleep(1.0)  # let the pool get going on the training set
        for _ in range(100):
            pids = _actor_pids(cluster, "EmbeddingProducer")
            if pids:
                pid = pids[0]
                os.kill(pid, signal.SIGKILL)
                killed.append((pid, time.time()))
                return
            time.sleep(0.2)

    lines: list[str] = []
    watcher = _watch(proc, lines, "epoch 0: streaming embeddings", kill_one)
    assert proc.wait(timeout=900) == 0, "".join(lines[-80:])
    watcher.join(10)
    assert killed, "no embedding actor was found to kill"
    audit = json.loads((out / "samples-epoch0-rank0.json").read_text())
    n_train = json.loads((out / "summary.json").read_text())["train_sequences"]
    ids = audit["ids"]
    print(f"killed embedding actor pid {killed[0][0]}; trainer consumed {len(ids)} samples")
    assert audit["started"] < killed[0][1] < audit["finished"]  # the kill landed mid-epoch
    assert len(ids) == len(set(ids)) == n_train  # every sample exactly once


def test_killed_training_worker_restores_from_checkpoint(cluster, tiny_dir, tmp_path):  # noqa: F811
    sets = ["--set", "train.epochs=3", "--set", "data.builtin_size=160"]
    ref = _start_job(cluster, tiny_dir, tmp_path / "ref", *sets)
    ref_out, _ = ref.communicate(timeout=900)
    assert ref.returncode == 0, ref_out[-4000:]
    baseline = json.loads((tmp_path / "ref" / "summary.json").read_text())

    out = tmp_path / "killed"
    killed: list[int] = []

    def kill_worker():
        pids = _actor_pids(cluster, "RayTrainWorker")
        assert pids
        os.kill(pids[0], signal.SIGKILL)
        killed.append(pids[0])

    proc = _start_job(cluster, tiny_dir, out, *sets)
    lines: list[str] = []
    # Kill a few steps into epoch 1, once the epoch-0 checkpoint has certainly been recorded.
    watcher = _watch(proc, lines, "progress: epoch 1 step 20", kill_worker)
    assert proc.wait(timeout=900) == 0, "".join(lines[-80:])
    watcher.join(10)
    text = "".join(lines)
    assert killed and "resumed from checkpoint after epoch 0" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["steps"] == baseline["steps"]
    audit = json.loads((out / "samples-epoch1-rank0.json").read_text())
    assert sorted(audit["ids"]) == sorted(set(audit["ids"]))  # the cache holds each batch once
    # The restarted worker resumes from the epoch-0 checkpoint and the object-store cache, so the
    # final validation loss matches the uninterrupted run up to float noise.
    print(f"final val loss: uninterrupted {baseline['val_loss_after']:.5f}, killed {summary['val_loss_after']:.5f}")
    assert summary["val_loss_after"] == pytest.approx(baseline["val_loss_after"], rel=1e-3)
