"""The trainer service (jobs/trainers.py): many jobs' fits in one warm process on a real local Ray
cluster, each the same fit Ray Train runs, none lost when the service's process dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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


# The caller's side of a fit on the service, as a fine-tuning API job runs it (finetune/runner.py),
# in its own process (a client of the test cluster, with its auth): a fit to its end, then a long
# one its caller gives up on after 3 steps. Prints what it saw as JSON.
CALLER = """
import json, sys, time
import ray
from carryon_ray.config import load_config
from carryon_ray.pipeline import InProcess, customize
from jobs import trainers

config_path, tiny, out = sys.argv[1:4]

def config(name, **sets):
    return load_config(config_path, {"base.name": tiny, "output.dir": f"{out}/{name}", **sets})

class GaveUp(Exception):
    pass

class Seen:  # the caller's Reporter: what the fit's metrics stream brought back
    def __init__(self, stop_at=None):
        self.steps, self.params, self.stop_at = [], {}, stop_at
    def metrics(self, values, step):
        if "train_loss_step" in values:
            self.steps.append(step)
    def params(self, values):
        self.params.update(values)
    def dataset(self, *args):
        pass
    def check(self):  # a cancelled job's check
        if self.stop_at is not None and len(self.steps) >= self.stop_at:
            raise GaveUp()

ray.init(logging_level="ERROR")
service = trainers.start(1, 1.0)
ray.get(service.ready.remote(), timeout=120)

def on_service(seen, name):
    return lambda cfg, calib, plan, sets, after_epoch: trainers.fit_embedded(
        service, cfg, calib, plan, sets, name, after_epoch, seen, seen.check)

seen, checkpoints = Seen(), []
cfg = config("service")
got = customize(cfg, InProcess(cfg, after_epoch=lambda t, m: checkpoints.append([t.epoch, t.step, m["val_loss"]]),
                               fit_on=on_service(seen, "parity")))
quitter = Seen(stop_at=3)
cfg = config("cancelled", **{"train.epochs": 200})
try:
    customize(cfg, InProcess(cfg, fit_on=on_service(quitter, "cancelled")))
    gave_up = False
except GaveUp:
    gave_up = True
t0 = time.time()
while (after := ray.get(service.describe.remote()))["running"] or not after["finished"]["stopped"]:
    if time.time() - t0 > 60:
        break
    time.sleep(0.5)
ray.kill(service)
print("RESULT", json.dumps({"got": {k: got[k] for k in ("trainers", "steps", "epochs", "history", "val_loss_after")},
                            "steps": seen.steps, "checkpoints": checkpoints, "gave_up": gave_up,
                            "quitter_steps": quitter.steps, "after": after, "stopped_in_s": time.time() - t0}))
"""


@pytest.mark.slow
def test_a_fit_of_rows_the_caller_embedded_matches_its_own_process_and_a_cancel_frees_the_slot(cluster, tiny_dir,
                                                                                            tmp_path):
    """What a fine-tuning API job does when the cluster runs the service (finetune/runner.py): the
    rows embedded in the caller's process, the epochs on the service (jobs/trainers.py:
    fit_embedded). It trains what the caller's own process trains (every alpha candidate to 1e-5,
    the final validation loss to 1e-4); each epoch's state comes back as the caller's checkpoint
    and every step's metrics reach the caller's reporter. A caller that gives up mid-fit (a
    cancelled job) stops the fit on the service at a step, and the service's slot is free again."""
    from carryon_ray.config import load_config
    from carryon_ray.pipeline import InProcess, customize

    here = load_config(ROOT / TINY_CONFIG, {"base.name": tiny_dir, "output.dir": str(tmp_path / "here")})
    ref = customize(here, InProcess(here))
    env = {**os.environ, **local_cluster.client_env(cluster), "RAY_ADDRESS": cluster["ray_address"],
           "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", CALLER, str(ROOT / TINY_CONFIG), tiny_dir, str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    seen = json.loads(res.stdout.split("RESULT ", 1)[1])
    got = seen["got"]
    assert got["trainers"] == "service" and got["steps"] == ref["steps"]
    for mine, theirs in zip(got["history"], ref["history"]):  # JSON: the alphas as strings
        want = {str(a): v for a, v in theirs["candidates"].items()}
        assert mine["candidates"].keys() == want.keys()
        assert all(mine["candidates"][a] == pytest.approx(v, abs=1e-5) for a, v in want.items())
    assert got["val_loss_after"] == pytest.approx(ref["val_loss_after"], rel=1e-4)
    assert seen["steps"] == list(range(1, ref["steps"] + 1))  # every step's metrics, once, in order
    per_epoch = ref["steps"] // ref["epochs"]
    assert [c[:2] for c in seen["checkpoints"]] == [[e + 1, per_epoch * (e + 1)] for e in range(ref["epochs"])]
    assert seen["checkpoints"][-1][2] == pytest.approx(got["val_loss_after"], rel=1e-6)
    # The caller that gave up after 3 steps: its fit stopped at a step, long before its end, and
    # the service's one slot is free (no fit running or waiting), within seconds.
    after = seen["after"]
    assert seen["gave_up"] and 3 <= max(seen["quitter_steps"]) < 200 * per_epoch
    assert after["finished"] == {"succeeded": 1, "failed": 0, "stopped": 1} and not after["running"], after
    assert not after["waiting"] and seen["stopped_in_s"] < 30, seen
