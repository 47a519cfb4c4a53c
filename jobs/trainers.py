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
                       fits run at once, more wait for a slot (a cancelled one stops waiting).
    train_on_service   the job's side: keeps the latest checkpoint, prints the lines, and on a
                       lost service (actor death) calls again from that checkpoint, up to
                       resources.max_failures times, as Ray Train would. A Ray job's fit reads
                       its Ray Datasets (jobs/backend.py); `fit_embedded` is the fit of rows a
                       caller embedded itself (a fine-tuning API job: finetune/runner.py).

Isolation: a fit is its thread and its queue. An exception ends that fit (its job gets the
traceback as a JobError) and nothing else; a job that gives up (cancelled) cancels its stream, and
the fit stops at its next batch (FitStopped); a slow fit holds one slot, not the others. Each fit runs
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
from typing import Callable, NamedTuple

from .backend import JobError

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

    def fit(self, job: str, loop, shards: dict, resume: bytes | None, report: bool = False):
        """Stream ("log", line), ("checkpoint", metrics, state bytes) per epoch and, last,
        ("done", summary) for one job's fit; a fit that fails raises with its traceback. With
        `report`, the fit's metrics and params stream too, as ("metrics", values, step) and
        ("params", values), for the caller to report (the loop's MLflow run gets none of them).
        `ray.cancel` on the stream (its caller was cancelled) stops the fit at its next batch."""
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
                                                  stopped=stop.is_set, reporter=_Streamed(events) if report else None))
                outcome = "succeeded"
                events.put(("done", summary))
            except FitStopped:
                outcome = "stopped"
                events.put(("stopped", None))
            except BaseException:  # noqa: BLE001 - the fit's job gets it; the service goes on
                if stop.is_set():  # its caller gave up first: what failed after (its cache gone, say) is no error
                    outcome = "stopped"
                    events.put(("stopped", None))
                else:
                    events.put(("error", traceback.format_exc()))
            finally:
                self.router.queues.pop(threading.get_ident(), None)
                with self.lock:
                    self.done[outcome] += 1
                    self.fits.pop(job, None)
                self.free.release()

        import ray

        context = ray.get_runtime_context()
        while not self.free.acquire(timeout=0.5):  # a slot: fits past `slots` wait here
            if context.is_canceled():
                with self.lock:
                    self.fits.pop(job, None)
                return
        with self.lock:
            self.fits[job].update(state="running", since=time.time())
        thread = threading.Thread(target=body, name=f"fit-{job}", daemon=True)
        thread.start()
        try:
            while True:
                if context.is_canceled():  # ray.cancel on this stream: the caller gave up on the fit
                    return
                try:
                    event = events.get(timeout=0.5)
                except queue.Empty:
                    continue
                if event[0] == "error":
                    raise FitFailed(event[1])
                yield event
                if event[0] in ("done", "stopped"):
                    return
        finally:  # done, or the caller cancelled the stream: the fit ends at its next batch
            stop.set()


class _Streamed:
    """A fit's Reporter when its caller reports (TrainerService.fit's `report`): metrics and params
    become events of the fit's stream."""

    def __init__(self, events: queue.Queue):
        self.events = events

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.events.put(("metrics", dict(values), step))

    def params(self, values: dict[str, object]) -> None:
        self.events.put(("params", dict(values)))

    def dataset(self, name: str, source: str, profile: list[dict], context: str) -> None:
        pass  # the caller describes its datasets itself


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


class TrainersUnavailable(JobError):
    """resources.trainers is 'shared' and the service does not run or cannot hold the fit."""


class TrainerChoice(NamedTuple):
    """Where a job's fit runs: `service` (the cluster's trainer service) or, when None, the job's
    own trainers, `why_not` saying why; `running` says whether a service runs at all."""

    service: object | None
    why_not: str | None
    running: bool


def choose(cfg) -> TrainerChoice:
    """The cluster's trainer service when a job should fit there (resources.trainers), else why
    not: the one rule for Ray jobs (jobs/backend.py) and fine-tuning API jobs
    (finetune/runner.py). 'auto' takes the service when it runs and can hold the fit; 'shared'
    requires it (TrainersUnavailable, naming the fix, when it cannot)."""
    import ray

    mode = cfg.resources.trainers
    if mode == "job":
        return TrainerChoice(None, "resources.trainers is 'job'", False)
    service = find()
    if service is None:
        if mode == "shared":
            raise TrainersUnavailable(
                "resources.trainers is 'shared' but no trainer service runs on this cluster: start one with "
                "`carryon trainers start` (or `carryon up --trainers N`), or set resources.trainers=auto to train "
                "on Ray Train")
        return TrainerChoice(None, "no trainer service runs on this cluster", False)
    reason = why_not(cfg, ray.get(service.describe.remote()))
    if reason is not None:
        if mode == "shared":
            raise TrainersUnavailable(f"resources.trainers is 'shared' but the trainer service cannot run this fit: "
                                      f"{reason}")
        return TrainerChoice(None, reason, True)
    return TrainerChoice(service, None, True)


def _wait_restarted(service, timeout_s: float = 600.0) -> None:
    """Until a restarted service answers (Ray restarts it: max_restarts=-1); a JobError after
    `timeout_s` (its node is gone and no other has room, say)."""
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError

    deadline, died = time.monotonic() + timeout_s, 0
    while True:
        try:
            ray.get(service.ready.remote(), timeout=30)
            return
        except ActorDiedError:  # a call caught in the death itself, or stopped for good (`carryon trainers stop`)
            died += 1
            if died >= 3:
                raise JobError("the trainer service was stopped while this job's fit ran: start it again, or set "
                               "resources.trainers=job to train on Ray Train") from None
            time.sleep(1.0)
        except (ActorUnavailableError, GetTimeoutError):  # unavailable while it restarts
            if time.monotonic() > deadline:
                raise JobError(f"the trainer service did not come back within {timeout_s:.0f} s: see "
                               "`carryon trainers status`, or set resources.trainers=job") from None
            time.sleep(1.0)


def train_on_service(service, loop, shards: Callable[[], dict], max_failures: int, run_name: str, *,
                     on_event: Callable[[tuple], None] | None = None, check: Callable[[], None] | None = None,
                     report: bool = False) -> dict:
    """The job's side of a fit on the trainer service: the fit's lines are printed here as they
    come, the last epoch's checkpoint is kept here, and a lost service (its process died) is called
    again from that checkpoint, up to `max_failures` times, as Ray Train retries a worker group.
    `shards()` gives each try's readers (a fresh iterator per Ray Dataset, or EmbeddedRows);
    `on_event` sees each checkpoint (and, with `report`, the fit's metrics and params); `check()`
    runs at least every second and raises to give up (a cancelled job): the stream is cancelled,
    the service stops the fit at its next batch and frees its slot, and the exception goes on.
    Returns the Trainer's state from the last checkpoint."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from carryon_ray.recipe import Trainer

    train_log = logging.getLogger("carryon.train")
    resume, failures = None, 0
    while True:
        stream = service.fit.remote(run_name, loop, shards(), resume, report)
        try:
            while True:
                if check is not None:
                    check()
                ready, _ = ray.wait([stream], timeout=1.0)
                if not ready:
                    continue
                try:
                    event = ray.get(next(stream))
                except StopIteration:  # the service ends a stream early only when it is cancelled
                    raise JobError("training failed: the trainer service stopped the fit") from None
                if event[0] == "log":
                    train_log.info("%s", event[1])
                    continue
                if event[0] == "checkpoint":
                    resume = event[2]
                elif event[0] == "done":
                    return Trainer.read_state_bytes(resume)
                if on_event is not None:
                    on_event(event)
        except (RayActorError, RayTaskError) as exc:
            failures += 1
            what = ("the trainer service was lost" if isinstance(exc, RayActorError)
                    else f"the fit failed: {str(exc).strip().splitlines()[-1][:300]}")
            if failures > max_failures:
                raise JobError(f"training failed: {what} ({failures} failures, resources.max_failures is "
                               f"{max_failures})\n{exc}") from None
            log.warning("%s; starting again from %s (failure %d of %d allowed)", what,
                        "its last checkpoint" if resume else "the beginning", failures, max_failures)
            _wait_restarted(service)
        except BaseException:  # the caller gave up (a cancelled job, an interrupt): so does the fit
            ray.cancel(stream)
            _wait_released(service, run_name)
            raise


def _wait_released(service, job: str, timeout_s: float = 30.0) -> None:
    """Until the service has let go of `job`'s fit (stopped at its next batch, its slot free).
    The caller's objects are the fit's input (its rows, its cache): a caller that ended right
    after `ray.cancel` could take them away before the cancel arrived (the request is asynchronous
    and travels from the caller), and the fit would fail reading them instead of stopping. (This
    was first suspected for a CI failure whose cause turned out to be another: the fit had already
    succeeded; tests/test_finetune.py's cancel test.) Bounded: a lost or stuck service never holds
    the caller more than `timeout_s`."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            seen = ray.get(service.describe.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - a service that does not answer holds nothing of ours
            return
        if job not in seen["running"] and job not in seen["waiting"]:
            return
        time.sleep(0.2)
    log.warning("the trainer service still holds fit %s %.0f s after it was cancelled", job, timeout_s)


class EmbeddedRows:
    """A dataset shard of rows already embedded (columns, as the producers return them), for a
    fit on the service whose caller embedded in its own process or through the serving replicas (a
    fine-tuning API job). The rows travel once, by reference; each try reads them again."""

    def __init__(self, rows: dict):
        import ray

        self.ref = ray.put(rows)

    def iter_batches(self, batch_size: int, batch_format: str = "numpy", prefetch_batches: int = 0):
        import ray

        from carryon_ray.embedding import row_batches

        assert batch_format == "numpy"
        yield from row_batches(ray.get(self.ref), batch_size)


def fit_embedded(service, cfg, calib, plan, sets: dict[str, dict], run_name: str,
                 after_epoch: Callable | None = None, reporter=None, check: Callable[[], None] | None = None) -> dict:
    """`Trainer.fit` on the trainer service over rows embedded by the caller (`sets`: "train",
    "val" and maybe "general", each the producers' columns in training order): what a fine-tuning
    API job fits with when the cluster runs the service. The same epoch loop as every other fit
    (jobs/train_loop.py: epoch 0 in the rows' order, later epochs shuffled from the service's
    cache), so it trains what the job's own process would. Each epoch's checkpoint reaches
    `after_epoch(trainer, metrics)` as a Trainer holding that state; the fit's metrics and params
    reach `reporter`. Returns the Trainer's final state."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from carryon_ray.recipe import Trainer

    from .cache import EmbeddingCache
    from .train_loop import TrainLoopConfig

    # The epochs after the first read the batches the fit put in a cache beside this process (it
    # owns their object-store copies), as a Ray job's cache sits beside its driver: a restarted
    # service resumes from the last checkpoint and reads them, nothing re-sent.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    cache = EmbeddingCache.options(scheduling_strategy=here).remote("memory", "")
    loop = TrainLoopConfig(cfg=cfg.model_dump(mode="json"), calibration=calib, plan=plan, cache=cache,
                           cache_mode="memory", cache_dir="", out_dir=None, eval_sets=[k for k in sets if k != "train"])
    shards = {name: EmbeddedRows(rows) for name, rows in sets.items()}

    def on_event(event: tuple) -> None:
        if event[0] == "checkpoint" and after_epoch is not None:
            trainer = Trainer(cfg, calib, plan)
            trainer.load_state_dict(Trainer.read_state_bytes(event[2]))
            after_epoch(trainer, event[1])
        elif event[0] == "metrics" and reporter is not None:
            reporter.metrics(event[1], event[2])
        elif event[0] == "params" and reporter is not None:
            reporter.params(event[1])

    state = train_on_service(service, loop, lambda: shards, cfg.resources.max_failures, run_name,
                             on_event=on_event, check=check, report=True)
    # Done with the cache. A caller that gave up leaves it to its process's end instead: the fit
    # it cancelled may still be storing its current batch there as it stops.
    ray.kill(cache)
    return state
