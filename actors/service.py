"""The producer service: a named set of embedding producers that any number of jobs embed through.

    ProducerService        a small actor (no CPU) that owns the producers (actors/embedder.py:
                           EmbeddingProducer) of each group, starts `min_size` of them on the
                           group's first use, adds one
                           when every producer is busy and the cluster has room for another (up to
                           `max_size`), and hands a caller the least loaded one.
    embed_through_producers the Ray Data task a job's pipeline runs per block: borrow a producer,
                           send it the rows, return the embedding rows; a producer that dies
                           mid-call is restarted by Ray and the block is sent again (to whichever
                           producer is free), so no row is lost or duplicated.

Three places, one code path:
- shared: `carryon up --producers CONFIG` (or `start_shared`) starts a detached service named
  SHARED_NAME for that config's bases; every job on the cluster whose bases are the same uses it,
  and rows of different jobs share forward batches (one base copy per producer, for its lifetime).
- co-serving: where the Serve app (`resources.coserve_app`) runs the job's bases, its model
  replicas ARE the producers: each embeds a job's rows in chunks between its decode steps
  (serve/replica.py: `embed`, serve/async_engine.py: `run_beside`), no second base copy.
- per job: a job that finds neither starts its own service (`start_for_job`), placed beside its
  driver, and stops it when its embedding ends.

Producers are created with small inline arguments (base configs), so Ray restarts them
(`max_restarts=-1`) without the "constructor arguments in the object store" error Ray Data's own
actor pools log; a job's Calibration reaches a producer by reference on its first call.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("carryon.job")

NAMESPACE = "carryon"
SHARED_NAME = "carryon-producers"
ATTEMPTS = 20  # calls of one block before its task fails (each producer death costs one)
BUSY = 2  # requests in flight at which a producer counts as busy (one forward running, one queued)
WAIT_CHECK_S = 15.0  # a block waiting this long on a producer asks whether that producer still runs
ROOM_CHECK_S = 5.0  # how often a busy group may ask the cluster whether another producer fits


class ProducerService:
    def __init__(self, base_cfgs: list[dict], groups: list[int | None], min_size: int, max_size: int,
                 resources: dict, max_batch_tokens: int = 4096, owner: str = "shared"):
        self.base_cfgs, self.groups, self.owner = base_cfgs, list(groups), owner
        self.min_size, self.max_size, self.resources = min_size, max_size, resources
        self.max_batch_tokens = max_batch_tokens
        self.producers: dict[int | None, list] = {g: [] for g in self.groups}
        self.ready: dict[int | None, list] = {g: [] for g in self.groups}
        self.load: dict[int | None, list[int]] = {g: [] for g in self.groups}
        self.uses: dict[int | None, list[int]] = {g: [] for g in self.groups}
        self.created = 0
        self.calls = 0
        self.failures = 0
        self.started = time.time()
        self.room_checked = 0.0
        self.lock = threading.Lock()  # acquire and release come from many callers' threads
        # Producers start on a group's first use (or `wait_ready`), not here: a job's own service
        # exists from calibration on, and a producer placed before the job's trainers could take
        # the capacity they need.

    # -- producers ------------------------------------------------------------------------------
    def _add(self, group: int | None) -> None:
        import ray

        from .embedder import EmbeddingProducer

        r = self.resources
        options = dict(num_cpus=r["num_cpus"], num_gpus=r["num_gpus"], resources=r.get("resources") or {},
                       max_restarts=-1, max_task_retries=0, max_concurrency=1000)
        actor = ray.remote(EmbeddingProducer).options(**options).remote(self.base_cfgs, group, self.max_batch_tokens)
        self.producers[group].append(actor)
        self.ready[group].append(actor.ready.remote())
        self.load[group].append(0)
        self.uses[group].append(0)
        self.created += 1

    def _ensure(self, group: int | None) -> None:
        while len(self.producers[group]) < self.min_size:
            self._add(group)

    def _room(self) -> bool:
        """Whether the cluster has free what one more producer asks for (a producer that could not
        be placed would wait for capacity the job's own trainers may need). Asked of the cluster at
        most every ROOM_CHECK_S: it is a round trip to the GCS, and acquire runs once per block."""
        import ray

        now = time.monotonic()
        if now - self.room_checked < ROOM_CHECK_S:
            return False
        self.room_checked = now
        free = ray.available_resources()
        r = self.resources
        want = {"CPU": r["num_cpus"], "GPU": r["num_gpus"], **(r.get("resources") or {})}
        return all(free.get(k, 0.0) >= v for k, v in want.items() if v)

    def _is_ready(self, group, i: int) -> bool:
        import ray

        ref = self.ready[group][i]
        if ref is True:
            return True
        done, _ = ray.wait([ref], timeout=0)
        if not done:
            return False
        try:  # finished is not ready: the call fails while the producer is dead or waits for a node
            ray.get(ref, timeout=0)
        except Exception:  # noqa: BLE001 - ask again; the producer is not chosen before it answers
            self.ready[group][i] = self.producers[group][i].ready.remote()
            return False
        self.ready[group][i] = True
        return True

    def acquire(self, group: int | None = None) -> tuple[int, object]:
        """(index, handle) of the least loaded producer of `group`, ready ones first; grows the
        group when every producer is busy and there is room."""
        with self.lock:
            self._ensure(group)
            load = self.load[group]
            if (min(load) >= BUSY and len(load) < self.max_size) and self._room():
                self._add(group)
                load = self.load[group]
            # ready first, then least loaded, then least used: with one block in flight at a time
            # every block would otherwise go to the first producer and the others idle
            i = min(range(len(load)), key=lambda k: (not self._is_ready(group, k), load[k], self.uses[group][k]))
            self.uses[group][i] += 1
            load[i] += 1
            self.calls += 1
            return i, self.producers[group][i]

    def wait_ready(self, timeout_s: float = 600) -> int:
        """Block until the first `min_size` producers of every group have loaded their bases (a
        producer that fails to load raises here); returns how many are ready."""
        import ray

        with self.lock:
            for g in self.groups:
                self._ensure(g)
        refs = [ref for g in self.groups for ref in self.ready[g] if ref is not True]
        ray.get(refs, timeout=timeout_s)
        with self.lock:
            for g in self.groups:
                self.ready[g] = [True if r in refs else r for r in self.ready[g]]
        return sum(len(v) for v in self.ready.values())

    def alive(self, group: int | None, i: int) -> bool:
        """Whether producer i runs now (Ray's state API): one that waits to be restarted, e.g.
        after its node went away, holds its callers' requests until it can be placed again."""
        from ray.util.state import get_actor

        try:
            state = get_actor(self.producers[group][i]._actor_id.hex())
        except Exception:  # noqa: BLE001 - the state API unreachable: assume it runs
            return True
        ok = state is not None and state.state == "ALIVE"
        if not ok:
            with self.lock:
                self.ready[group][i] = self.producers[group][i].ready.remote()  # not ready until it answers
        return ok

    def release(self, group: int | None, i: int, failed: bool = False) -> None:
        with self.lock:
            self.load[group][i] = max(0, self.load[group][i] - 1)
            if failed:
                self.failures += 1
                self.ready[group][i] = self.producers[group][i].ready.remote()  # restarting: not ready yet

    def forget(self, job: str) -> None:
        """`job` ended or was cancelled: every producer drops the job's waiting requests (their
        callers get an error at once) and its calibration, instead of running work nobody reads."""
        with self.lock:
            actors = [a for group in self.producers.values() for a in group]
        for a in actors:
            a.forget.remote(job)

    # -- what it is -------------------------------------------------------------------------------
    def serves(self, base_cfgs: list[dict]) -> bool:
        return base_cfgs == self.base_cfgs

    def describe(self) -> dict:
        import ray

        per = []
        for g, actors in self.producers.items():
            for a in actors:
                try:
                    per.append({"group": g, **ray.get(a.describe.remote(), timeout=10)})
                except Exception as exc:  # noqa: BLE001 - a restarting producer is reported as such
                    per.append({"group": g, "error": type(exc).__name__})
        return {"owner": self.owner, "bases": [c.get("name") for c in self.base_cfgs], "producers": len(per),
                "created": self.created, "calls": self.calls, "failures": self.failures,
                "in_use": sum(sum(v) for v in self.load.values()),
                "uptime_s": round(time.time() - self.started, 1), "per_producer": per}

    def stop(self) -> None:
        import ray

        with self.lock:
            for actors in self.producers.values():
                for a in actors:
                    ray.kill(a, no_restart=True)


def producer_resources(r) -> dict:
    """What each producer reserves, from a ResourcesConfig."""
    return {"num_cpus": r.embed_cpus, "num_gpus": r.embed_gpus, "resources": {r.inference_resource: 1}}


def _start(name: str, cfg, groups: list[int | None], owner: str, detached: bool, scheduling=None):
    import ray

    r = cfg.resources
    bases = [b.model_dump(mode="json") for b in [cfg.base, *cfg.extra_bases]]
    options = dict(name=name, namespace=NAMESPACE, num_cpus=0, max_restarts=-1, max_concurrency=64)
    if detached:
        options["lifetime"] = "detached"
    if scheduling is not None:
        options["scheduling_strategy"] = scheduling
    return ray.remote(ProducerService).options(**options).remote(
        bases, groups, r.embed_actors_min, r.embed_actors_max, producer_resources(r), r.embed_max_batch_tokens, owner)


def start_shared(cfg):
    """The cluster's shared service for `cfg`'s bases (detached: it outlives the caller)."""
    return _start(SHARED_NAME, cfg, [None], "shared", detached=True)


def start_for_job(cfg, job: str, scheduling=None):
    """A job's own service (ends with the job's driver at the latest): one group of producers, or
    one per base when model mixing asks for a pool per base."""
    groups = list(range(1 + len(cfg.extra_bases))) if cfg.extra_bases and cfg.resources.pool_per_base else [None]
    return _start(f"carryon-producers-{job}", cfg, groups, job, detached=False, scheduling=scheduling)


def find_shared(cfg):
    """The shared service if one runs and embeds `cfg`'s bases, else None."""
    import ray

    try:
        service = ray.get_actor(SHARED_NAME, namespace=NAMESPACE)
    except ValueError:
        return None
    bases = [b.model_dump(mode="json") for b in [cfg.base, *cfg.extra_bases]]
    return service if ray.get(service.serves.remote(bases)) else None


COSERVE = "serve:"  # a service name that means: the model replicas of this Serve application
REPLICA = "ModelServer"  # the replicas' deployment (serve/replica.py)


def replicas(app: str):
    """A handle to the model replicas of Serve application `app`, or None when Serve or the app does
    not run (checked without starting anything)."""
    import ray

    try:
        ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    except ValueError:
        return None
    import logging

    from ray import serve

    # Serve's client-side lines (its router starting, "Failed to get queue length" while a replica
    # is busy) would land in the job's log from every process that calls the replicas; the job
    # reports its own waits and failures.
    logging.getLogger("ray.serve").setLevel(logging.ERROR)
    try:
        return serve.get_deployment_handle(REPLICA, app_name=app)
    except Exception:  # noqa: BLE001 - no such application or deployment
        return None


def find_coserving(cfg):
    """The replicas of `resources.coserve_app` if they run `cfg`'s bases, else None."""
    handle = replicas(cfg.resources.coserve_app)
    if handle is None:
        return None
    bases = [b.model_dump(mode="json") for b in [cfg.base, *cfg.extra_bases]]
    try:
        return handle if handle.base_configs.remote().result(timeout_s=60) == bases else None
    except Exception:  # noqa: BLE001 - an app that cannot answer is not one to embed through
        return None


def _retryable() -> tuple:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    return (RayActorError, ActorDiedError, ActorUnavailableError, BackPressureError, DeploymentUnavailableError,
            ReplicaUnavailableError)


def replica_call(app: str, method: str, *args, what: str = "a call"):
    """`method(*args)` on one of the model replicas of Serve app `app` (Serve picks it); a replica
    lost mid-call is retried on whichever Serve picks next (Serve restarts the lost one)."""
    handle = replicas(app)
    if handle is None:
        raise RuntimeError(f"the Serve application {app!r} that {what} needs no longer runs")
    for attempt in range(ATTEMPTS):
        try:
            return getattr(handle, method).remote(*args).result()
        except _retryable() as exc:
            if attempt == 0:
                log.warning("a replica of %s was lost during %s (%s); sending it again", app, what, type(exc).__name__)
            time.sleep(min(5.0, 0.5 * (attempt + 1)))
    raise RuntimeError(f"{ATTEMPTS} tries of the replicas of {app} failed during {what}")


def _through_replicas(app: str, job: str, calibration: list, batch: dict, last: bool) -> dict:
    """Co-serving: the block goes to one of the app's model replicas, which embeds it between its
    decode steps."""
    return replica_call(app, "embed", job, calibration, batch, last, what=f"one batch of job {job}")


class ProducerLost(RuntimeError):
    """A producer that holds a block but is not running (Ray waits for room to restart it)."""


_SERVICES: dict[str, object] = {}  # per worker process: service name -> handle


def embed_through_producers(block: dict, service: str, job: str, calibration: list, group: int | None,
                            last: bool, rows: int) -> dict:
    """Ray Data task: one block of `job`'s token rows, embedded by a producer of `service` (or by a
    model replica: `service` = "serve:APP"), as requests of `rows` rows (resources.embed_batch_size)
    sent at once, so the producer's queue holds them all and its forwards fill its token budget."""
    from carryon_ray.rows import ROW_INPUT_IDS, concat_rows

    n = len(block[ROW_INPUT_IDS])
    parts = [{k: v[at : at + rows] for k, v in block.items()} for at in range(0, n, rows)] or [block]
    if service.startswith(COSERVE):
        return concat_rows([_through_replicas(service[len(COSERVE):], job, calibration, part, last) for part in parts])
    return _through_service(parts, service, job, calibration, group, last)


def _through_service(parts: list[dict], service: str, job: str, calibration: list, group: int | None,
                     last: bool) -> dict:
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    from carryon_ray.rows import concat_rows
    lost = (RayActorError, ActorDiedError, ActorUnavailableError, ProducerLost)
    for attempt in range(ATTEMPTS):
        svc = _SERVICES.get(service)
        if svc is None:  # one lookup per worker process: the task runs once per batch of rows
            svc = _SERVICES[service] = ray.get_actor(service, namespace=NAMESPACE)
        try:
            i, producer = ray.get(svc.acquire.remote(group))
        except lost:  # the service itself restarted or was replaced: look it up again
            _SERVICES.pop(service, None)
            time.sleep(min(5.0, 0.5 * (attempt + 1)))
            continue
        try:
            refs = [producer.embed.remote(job, calibration, part, last) for part in parts]
            while True:  # a producer waiting for a node to restart on would hold the block forever
                done, waiting = ray.wait(refs, num_returns=len(refs), timeout=WAIT_CHECK_S)
                if not waiting or ray.get(svc.alive.remote(group, i)):
                    if not waiting:
                        break
                    continue
                for ref in waiting:
                    try:
                        ray.cancel(ref)
                    except Exception:  # noqa: BLE001 - it is being given up either way
                        pass
                raise ProducerLost("the producer is not running (waiting to be restarted)")
            out = concat_rows(ray.get(refs))
        except lost as exc:
            svc.release.remote(group, i, failed=True)
            if attempt == 0:  # one line per block; Ray restarts the producer meanwhile
                log.warning("producer %d of %s was lost mid-batch (%s); sending the batch again", i, service,
                            type(exc).__name__)
            time.sleep(min(5.0, 0.5 * (attempt + 1)))
            continue
        except BaseException:  # the job's own error (a calibration that does not fit): not the producer's load
            svc.release.remote(group, i)
            raise
        svc.release.remote(group, i)
        return out
    raise RuntimeError(f"{ATTEMPTS} producers of {service} died while embedding one batch of job {job}")
