"""The trainer service: one long-lived process on a training-class node that runs many small fits
at once, each job's `Trainer.fit` in a thread of its own.

Why. A job on Ray Train starts a controller, a worker and a placement-group cleaner: three Python
processes that each import torch and Ray (~4.5 CPU-s per worker import here) for a carry-on fit
that may take seconds. With eight jobs on a small machine that was most of the cost
(docs/benchmarks.md, "Many jobs, one base"). The service imports once and keeps the processes warm;
each fit is a thread, and torch's kernels release the GIL, so fits interleave.

    TrainerService     the named, detached actor (`carryon up --trainers N` or
                       `carryon trainers start`): `fit` is a streaming call per job that yields the
                       fit's log lines and each epoch's checkpoint, then its summary; up to `slots`
                       fits run at once, more wait for a slot in arrival order.
    train_on_service   the job's side (jobs/backend.py): keeps the latest checkpoint, prints the
                       lines, and on a lost service (actor death) calls again from that checkpoint,
                       up to resources.max_failures times, as Ray Train would.

Isolation: a fit is its thread and its queue. An exception ends that fit (its job gets the
traceback as a JobError) and nothing else; a job whose driver goes away closes its stream, and the
fit stops at its next batch (FitStopped); a slow fit holds one slot, not the others. Each fit runs
the same epoch loop as a Ray Train worker (jobs/train_loop.py: `run_worker`), with the job's own
cache, audit files and checkpoints (the checkpoints travel to the job, so a restarted service
resumes a job from its last epoch).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback

log = logging.getLogger("carryon.job")

NAMESPACE = "carryon"
TRAINERS_NAME = "carryon-trainers"
ROUTED = ("carryon.train", "carryon.progress")  # the loggers a fit's lines come from


class _ByThread(logging.Handler):
    """Sends each record to the queue of the fit whose thread logged it (fits share the loggers)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.queues: dict[int, queue.Queue] = {}
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        q = self.queues.get(record.thread)
        if q is not None:
            q.put(("log", self.format(record)))


class TrainerService:
    """Fits of any number of jobs, `slots` at a time, in one process (see the module's docstring)."""

    def __init__(self, slots: int, resources: dict):
        import torch

        self.slots, self.resources = slots, resources
        self.free = threading.Semaphore(slots)
        self.lock = threading.Lock()
        self.fits: dict[str, dict] = {}  # job -> what describe() shows
        self.done = {"succeeded": 0, "failed": 0, "stopped": 0}
        self.started = time.time()
        # torch's intra-op threads are per process: the service's CPUs, shared by its fits
        torch.set_num_threads(max(1, int(resources.get("num_cpus") or 1)))
        self.router = _ByThread()
        for name in ROUTED:
            logger = logging.getLogger(name)
            logger.addHandler(self.router)
            logger.setLevel(logging.INFO)
            logger.propagate = False

    def ready(self) -> bool:
        return True

    def describe(self) -> dict:
        with self.lock:
            return {"name": TRAINERS_NAME, "slots": self.slots, "resources": self.resources,
                    "running": {j: dict(f) for j, f in self.fits.items() if f["state"] == "running"},
                    "waiting": sorted(j for j, f in self.fits.items() if f["state"] == "waiting"),
                    "finished": dict(self.done), "uptime_s": round(time.time() - self.started, 1)}

    def fit(self, job: str, loop, shards: dict, resume: bytes | None):
        """Stream ("log", line), ("checkpoint", metrics, state bytes) per epoch and, last,
        ("done", summary) for one job's fit; a fit that fails raises with its traceback."""
        from .train_loop import FitStopped, Worker, run_worker

        events: queue.Queue = queue.Queue()
        stop = threading.Event()
        with self.lock:
            self.fits[job] = {"state": "waiting", "since": time.time()}

        def checkpoint(trainer, metrics: dict) -> None:
            blob = trainer.state_bytes()
            with self.lock:
                self.fits[job].update(epoch=trainer.epoch, step=trainer.step)
            events.put(("checkpoint", metrics, blob))

        def body() -> None:
            self.router.queues[threading.get_ident()] = events
            outcome = "failed"
            try:
                from carryon_ray.recipe import Trainer

                state = None if resume is None else Trainer.read_state_bytes(resume)
                summary = run_worker(loop, Worker(0, 1, lambda name: shards[name], lambda m: m, state, checkpoint,
                                                  stopped=stop.is_set))
                outcome = "succeeded"
                events.put(("done", summary))
            except FitStopped:
                outcome = "stopped"
                events.put(("stopped", None))
            except BaseException:  # noqa: BLE001 - the fit's job gets it; the service goes on
                events.put(("error", traceback.format_exc()))
            finally:
                self.router.queues.pop(threading.get_ident(), None)
                with self.lock:
                    self.done[outcome] += 1
                    self.fits.pop(job, None)
                self.free.release()

        self.free.acquire()  # a slot: fits past `slots` wait here, in arrival order
        with self.lock:
            self.fits[job].update(state="running", since=time.time())
        thread = threading.Thread(target=body, name=f"fit-{job}", daemon=True)
        thread.start()
        try:
            while True:
                event = events.get()
                if event[0] == "error":
                    raise FitFailed(event[1])
                yield event
                if event[0] in ("done", "stopped"):
                    return
        finally:  # the job closed its stream (done, or its driver went away): the fit ends at its next batch
            stop.set()


class FitFailed(RuntimeError):
    """A fit's own error (its traceback is the message); the service itself is fine."""


def service_resources(cpus: float, gpus: float, training_resource: str) -> dict:
    return {"num_cpus": cpus, "num_gpus": gpus, "resources": {training_resource: 1}}


def start(slots: int, cpus: float, gpus: float = 0.0, training_resource: str = "training_node"):
    """The cluster's trainer service (detached: it outlives the caller); Ray restarts it if its
    process dies, and the jobs whose fits it held call again from their last checkpoints."""
    import ray

    r = service_resources(cpus, gpus, training_resource)
    return ray.remote(TrainerService).options(
        name=TRAINERS_NAME, namespace=NAMESPACE, lifetime="detached", max_restarts=-1, max_task_retries=0,
        # a thread per call: fits waiting for a slot each hold one, describe() never waits behind them
        num_cpus=cpus, num_gpus=gpus, resources=r["resources"], max_concurrency=256,
    ).remote(slots, r)


def find():
    """The running trainer service, or None (nothing is started)."""
    import ray

    try:
        return ray.get_actor(TRAINERS_NAME, namespace=NAMESPACE)
    except ValueError:
        return None


def why_not(cfg, seen: dict) -> str | None:
    """Why the service cannot run this job's fit (the job then trains on Ray Train), or None."""
    r = cfg.resources
    if r.train_workers_max > 1:
        return (f"resources.train_workers_max is {r.train_workers_max}: the service runs one worker per fit "
                "(several workers, DDP, run on Ray Train)")
    if r.train_gpus > (seen["resources"].get("num_gpus") or 0):
        return f"resources.train_gpus is {r.train_gpus} and the service holds {seen['resources'].get('num_gpus', 0)}"
    if r.training_resource not in (seen["resources"].get("resources") or {}):
        return f"the service is not on a {r.training_resource!r} node"
    return None
