"""The trainer service (jobs/trainers.py): many jobs' fits in one warm process on a real local Ray
cluster, each the same fit Ray Train runs, none lost when the service's process dies."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from datetime import datetime

import pytest

from conftest import ROOT
from jobs import local_cluster
from test_job import TINY_CONFIG, _actor_pids, _carryon, _reap_jobs, _start_job, _watch  # noqa: F401 (_reap_jobs: autouse)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Its own cluster: the service is a detached actor, and jobs elsewhere must not find it. Six
    logical CPUs on this machine's cores: two jobs' producers and tokenizers beside the service."""
    state_dir = tmp_path_factory.mktemp("carryon-cluster")
    state = local_cluster.up(str(state_dir), num_cpus=6, with_mlflow=False)
    yield state
    assert local_cluster.down(str(state_dir))
    assert not local_cluster._stragglers(state["ray_temp_dir"])


@pytest.mark.slow
def test_jobs_fit_side_by_side_in_one_service_process_and_resume_when_it_dies(cluster, tiny_dir, tmp_path):
    """Two jobs with different data and lengths fit at once in the service (their fits' spans
    overlap); each trains what `carryon train` trains on its config
    (epoch 0's alpha candidates to 1e-5). The service's process is killed once both fits are past
    epoch 0 and one still runs: Ray restarts it, that job calls again from its last checkpoint, and
    both end as the uninterrupted runs do (final validation loss to 1e-3), every sample once per
    epoch. The CLI starts, shows and stops the service."""
    from carryon_ray.config import load_config
    from carryon_ray.pipeline import fit_in_process

    res = _carryon(cluster, "trainers", "start", "--slots", "2", "--cpus", "1")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "fits at once" in res.stdout
    again = _carryon(cluster, "trainers", "start")
    assert again.returncode == 1 and "already runs" in again.stderr

    service = _actor_pids(cluster, "TrainerService")
    assert len(service) == 1, service

    # short: 96 arithmetic rows, 3 epochs; long: 320 topic rows in small requests, 4 epochs (a long
    # epoch 0, so the two fits are held at once). The service's process is killed once, when both
    # fits are past epoch 0 (each has a checkpoint to come back from: a fit restarted from scratch
    # re-streams its rows in another order) and at least one is still running: the one that passed
    # epoch 0 last, at the start of its epoch 1. Which job that is depends on the machine's load.
    jobs = {"short": {"train.epochs": 3},
            "long": {"train.epochs": 4, "data.train": "builtin:topics", "data.builtin_size": 320, "train.seed": 7,
                     "resources.embed_batch_size": 2}}
    common = {"resources.trainers": "shared", "train.progress_s": 0}
    procs, lines, watchers, outs = {}, {}, {}, {}
    killed: list[float] = []
    phase = {name: "epoch 0" for name in jobs}
    lock = threading.Lock()

    def moved(name: str, to: str):
        def action():
            with lock:
                if phase[name] == "epoch 0" or to == "done":
                    phase[name] = to
                if not killed and "epoch 0" not in phase.values() and "cached" in phase.values():
                    os.kill(service[0], signal.SIGKILL)
                    killed.append(time.time())
        return action

    for name, sets in jobs.items():
        outs[name] = tmp_path / name
        procs[name] = _start_job(cluster, tiny_dir, outs[name],
                                 *[a for k, v in {**common, **sets}.items() for a in ("--set", f"{k}={v}")])
        lines[name] = []
        watchers[name] = _watch(procs[name], lines[name], {"epoch 1: reading cached embeddings": moved(name, "cached"),
                                                           "adapter saved to": moved(name, "done")})
    codes = {}
    for name, proc in procs.items():
        codes[name] = proc.wait(timeout=900)
        watchers[name].join(10)
    text = {name: "".join(ls) for name, ls in lines.items()}
    for name in jobs:  # their timelines (the step lines left out), shown with -s or when an assertion fails
        print(f"--- {name}\n" + "".join(ln for ln in lines[name] if "training: epoch" not in ln or "step 1/" in ln))
    assert codes == {"short": 0, "long": 0}, codes
    assert killed, ("the service was never killed", phase)

    def span(name: str) -> tuple[datetime, datetime]:
        """When the job's driver handed its fit to the service, and when the fit's adapter was saved
        (the log lines' own clock: the two watchers started at different times)."""
        def at(marker: str) -> datetime:
            line = next(ln for ln in lines[name] if marker in ln)
            return datetime.strptime(line.split("] ", 1)[1][:23], "%Y-%m-%d %H:%M:%S,%f")
        return at("training on the cluster's trainer service"), at("adapter saved to")

    (a0, a1), (b0, b1) = span("short"), span("long")
    # Two fits held by the service at once. (Their epoch-0 audits need not overlap: under load one
    # job's start lagged the other's by ~55 s, and the kill then restarted its fit in a new process.)
    assert a0 < b1 and b0 < a1, (a0, a1, b0, b1)
    for name, sets in jobs.items():
        summary = json.loads((outs[name] / "summary.json").read_text())
        assert "training on the cluster's trainer service" in text[name]
        assert "training: epoch 0, step 1/" in text[name]  # the fit's own lines reach its job's log
        for epoch in range(summary["epochs"]):
            ids = json.loads((outs[name] / f"samples-epoch{epoch}-rank0.json").read_text())["ids"]
            assert len(ids) == len(set(ids)) == summary["train_sequences"], (name, epoch)  # once each
        cfg = load_config(ROOT / TINY_CONFIG, {"base.name": tiny_dir, **sets, "output.dir": str(tmp_path / "ref" / name)})
        ref = fit_in_process(cfg)
        assert summary["steps"] == ref["steps"] and summary["epochs"] == ref["epochs"]
        got = summary["history"][0]["candidates"]  # JSON: the alphas as strings
        want = {str(a): v for a, v in ref["history"][0]["candidates"].items()}
        assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], abs=1e-5) for k in want), name
        assert summary["val_loss_after"] == pytest.approx(ref["val_loss_after"], rel=1e-3), name
    # The kill landed in a fit past its epoch 0: it came back from a checkpoint, not from the start.
    lost = [name for name in jobs if "the trainer service was lost; starting again from its last checkpoint" in text[name]]
    assert lost, {name: text[name][-3000:] for name in jobs}
    assert all("resumed from checkpoint after epoch" in text[name] for name in lost), lost
    print(f"the kill landed in: {lost}")

    res = _carryon(cluster, "trainers", "status")
    seen = json.loads(res.stdout)
    assert res.returncode == 0 and seen["slots"] == 2 and not seen["running"], res.stdout
    res = _carryon(cluster, "trainers", "stop")
    assert res.returncode == 0 and "stopped the trainer service" in res.stdout
    assert _carryon(cluster, "trainers", "status").returncode == 1


def test_a_job_the_service_cannot_hold_says_why():
    """The reasons the service turns a fit away (resources.trainers=auto then trains on Ray Train
    and logs the reason; 'shared' fails the job with it)."""
    from carryon_ray.config import load_config
    from jobs import trainers

    seen = {"resources": trainers.service_resources(1.0, 0.0, "training_node")}
    cfg = load_config(ROOT / TINY_CONFIG, {"base.name": "x"})
    assert trainers.why_not(cfg, seen) is None
    multi = cfg.model_copy(update={"resources": cfg.resources.model_copy(update={"train_workers_max": 2})})
    assert "train_workers_max is 2" in trainers.why_not(multi, seen)
    gpu = cfg.model_copy(update={"resources": cfg.resources.model_copy(update={"train_gpus": 1.0})})
    assert "train_gpus is 1.0" in trainers.why_not(gpu, seen)
    other = {"resources": trainers.service_resources(1.0, 0.0, "spot_node")}
    assert "not on a 'training_node' node" in trainers.why_not(cfg, other)
