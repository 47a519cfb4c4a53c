"""A job that cannot be scheduled says so.

Ray leaves a demand it cannot place pending for an autoscaler; on one machine without one (a laptop
whose CPUs `carryon serve` holds) the job just hangs without a word. `ResourceWatch` is a driver
thread that looks at the cluster every `interval_s`: whatever of this job is pending (actors, tasks,
placement groups: Ray's state API), what it asks for, what is free, and who holds the rest. It logs
that while it lasts, and after `resources.wait_timeout_s` of continuous waiting it ends the job with
the same message (None: wait forever, for autoscaling clusters).
"""

from __future__ import annotations

import _thread
import logging
import os
import sys
import threading
import time
import traceback

log = logging.getLogger("carryon.job")

# What pending work is, in the config's words: the class or task name -> (what it is, the field to lower).
KNOWN = {
    "tokenize_batch": ("the tokenize tasks", "resources.tokenize_cpus"),
    "EmbeddingProducer": ("the embedding actors", "resources.embed_cpus / embed_gpus"),
    "calibrate": ("the calibration task", "resources.embed_cpus / embed_gpus"),
    "RayTrainWorker": ("the training workers", "resources.train_cpus / train_gpus"),
    "score_heldout": ("the held-out scoring task", "resources.embed_cpus / embed_gpus"),
}


INTERRUPT_GRACE_S = 30.0  # how long the driver has to answer the watch's interrupt before the watch ends it
LIMIT = 10_000  # the state API's rows per listing (its default, 100, misses most of a busy cluster)


def _real(res: dict) -> dict:
    """The resources a user asks for: no placement-group shadows (CPU_group_...), no node: labels."""
    return {k: v for k, v in res.items() if v and "_group" not in k and not k.startswith(("node:", "bundle_group"))}


def _fmt(res: dict) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(_real(res).items()))


def pending_demands(job_id: str | None = None, address: str | None = None) -> list[tuple[str, dict]]:
    """(name, resources) of every actor, task and placement group still waiting for resources."""
    from ray.util.state import list_actors, list_placement_groups, list_tasks

    out = []
    for a in list_actors(address=address, filters=[("state", "=", "PENDING_CREATION")], detail=True, limit=LIMIT,
                         raise_on_missing_output=False):
        if a.pid:  # placed: its worker process runs the constructor (loading a base can take minutes)
            continue
        if (job_id is None or a.job_id == job_id) and _real(a.required_resources or {}):
            out.append((a.class_name, _real(a.required_resources)))
    for t in list_tasks(address=address, filters=[("state", "=", "PENDING_NODE_ASSIGNMENT")], detail=True,
                        limit=LIMIT, raise_on_missing_output=False):
        if (job_id is None or t.job_id == job_id) and t.type == "NORMAL_TASK" and _real(t.required_resources or {}):
            out.append((t.func_or_class_name or t.name, _real(t.required_resources)))
    for pg in list_placement_groups(address=address, filters=[("state", "=", "PENDING")], detail=True, limit=LIMIT,
                                    raise_on_missing_output=False):
        if job_id is not None and pg.creator_job_id != job_id:
            continue
        total: dict = {}
        for b in pg.bundles or []:
            for k, v in _real(b.get("unit_resources") or {}).items():
                total[k] = total.get(k, 0) + v
        if total:  # Ray Train places its worker group as a placement group
            out.append(("RayTrainWorker", total))
    return out


def kind(name: str) -> str:
    """The stage a pending or live actor or task belongs to: its KNOWN key, else its own name."""
    return next((k for k in KNOWN if k in name), name)


def stage(name: str) -> tuple[str, str]:
    """(what the stage is, the config field to lower) in the config's words."""
    return KNOWN.get(kind(name), (name, "resources.*"))


def split_pending(pending: list[tuple[str, dict]], live: set[str]) -> tuple[list, list]:
    """(blocked, partial): pending demands of stages with nothing placed, and of stages that run
    but cannot grow."""
    return [p for p in pending if kind(p[0]) not in live], [p for p in pending if kind(p[0]) in live]


def live_stages(job_id: str | None = None, address: str | None = None) -> set[str]:
    """The stages of the job that have something placed: a live actor (an embedding actor or a
    training worker, idle or not, or one still in its constructor) or a task running now."""
    from ray.util.state import list_actors, list_tasks

    live = {kind(a.class_name) for a in list_actors(address=address, detail=True, limit=LIMIT,
                                                    raise_on_missing_output=False)
            if (a.state == "ALIVE" or (a.state == "PENDING_CREATION" and a.pid))  # placed, maybe constructing
            and (job_id is None or a.job_id == job_id)}
    for t in list_tasks(address=address, filters=[("state", "=", "RUNNING")], detail=True, limit=LIMIT,
                        raise_on_missing_output=False):
        if (job_id is None or t.job_id == job_id) and t.type == "NORMAL_TASK" and _real(t.required_resources or {}):
            live.add(kind(t.func_or_class_name or t.name))
    return live


def holders(address: str | None = None) -> list[tuple[str, dict]]:
    """(what, resources) held by live actors, Serve replicas summed as one entry."""
    from ray.util.state import list_actors

    serve: dict = {}
    out = []
    for a in list_actors(address=address, filters=[("state", "=", "ALIVE")], detail=True, limit=LIMIT,
                         raise_on_missing_output=False):
        res = _real(a.required_resources or {})
        if not res:
            continue
        if a.class_name.startswith(("ServeReplica", "ServeController", "ProxyActor")):
            for k, v in res.items():
                serve[k] = serve.get(k, 0) + v
        else:
            out.append((a.class_name, res))
    if serve:
        out.insert(0, ("Serve replicas", serve))
    return out


def describe(pending: list[tuple[str, dict]], address: str | None = None) -> str:
    """One message: what waits for what, what is free, who holds the rest, what to change."""
    import ray

    free, total = ray.available_resources(), ray.cluster_resources()
    lines = []
    for name, res in pending:
        what, field = stage(name)
        short = _real(res)
        have = ", ".join(f"{free.get(k, 0):g} of {total.get(k, 0):g} {k} free" for k in sorted(short))
        lines.append(f"waiting for {_fmt(short)} for {what} ({have}); lower {field}, or free the cluster")
    held = "; ".join(f"{w} hold {_fmt(r)}" for w, r in holders(address)[:6])
    return "\n".join(lines) + (f"\n  held: {held}" if held else "") + (
        "\n  (stop serving with `carryon serve --stop`, or add nodes; an autoscaling cluster adds them itself)")


class ResourceWatch(threading.Thread):
    """Logs every `interval_s` what this job waits for while it is blocked: a stage of it is pending
    with nothing of that stage placed (no embedding actor at all, no training worker, no tokenize
    task running); after `timeout_s` of that it interrupts the driver's main thread, which raises
    `WaitTimeout` (see `check`). A stage that cannot grow (an elastic pool that cannot add its next
    actor, Train that cannot add a worker) is no warning: it is counted in `partial` for the job's
    stats. Whether work runs at the moment of a look says nothing: a pool waits on backpressure
    while the trainer works, and a short task is over before the state API sees it."""

    def __init__(self, interval_s: float = 30.0, timeout_s: float | None = 600.0, job_id: str | None = None,
                 grace_s: float = INTERRUPT_GRACE_S):
        super().__init__(name="carryon-resource-watch", daemon=True)
        self.interval_s, self.timeout_s, self.job_id, self.grace_s = interval_s, timeout_s, job_id, grace_s
        # The cluster to ask, by its GCS address (set with job_id once connected): without it the
        # state API guesses, and fails when another Ray runs on the machine.
        self.address: str | None = None
        self.message: str | None = None  # set when the timeout fired
        self.partial: dict[str, int] = {}  # what waited while other work of the job ran -> times seen
        self._done = threading.Event()

    def run(self) -> None:
        since = None
        while not self._done.wait(self.interval_s):
            try:
                pending = pending_demands(self.job_id, self.address)
                live = live_stages(self.job_id, self.address) if pending else set()
            except Exception as exc:  # noqa: BLE001 - the state API needs the dashboard; never break the job
                log.debug("resource watch: state API unavailable (%s)", exc)
                continue
            pending, partial = split_pending(pending, live)
            for name, _ in partial:  # capacity the stage could use, not a stall
                what = stage(name)[0]
                self.partial[what] = self.partial.get(what, 0) + 1
            if not pending:
                since = None
                continue
            if since is None:  # seen once: actors and workers are pending for a moment while they start
                since = time.monotonic()
                continue
            msg = describe(pending, self.address)
            waited = time.monotonic() - since
            log.warning("%s (waiting %.0fs)", msg, waited)
            if self.timeout_s is not None and waited >= self.timeout_s:
                self.message = (f"the job could not be scheduled for {waited:.0f}s (resources.wait_timeout_s = "
                                f"{self.timeout_s:g}):\n  {msg}")
                _thread.interrupt_main()
                self._force_exit()
                return

    def _force_exit(self) -> None:
        """The interrupt reaches the main thread only when it runs Python code: a wait inside a
        library that never polls for signals would hold the job forever. If the driver has not
        ended the job within `grace_s`, this thread does, with the same message."""
        if self._done.wait(self.grace_s):
            return  # the driver answered the interrupt (RayBackend.__exit__ stops this watch)
        main = sys._current_frames().get(threading.main_thread().ident)
        where = traceback.extract_stack(main)[-1] if main is not None else None
        log.warning("the driver did not answer the interrupt in %gs (its main thread waited at %s); ending the job",
                    self.grace_s, where)
        print(f"error: {self.message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)

    def stop(self) -> None:
        self._done.set()
