"""Embedding producers: the frozen base(s) on inference-class nodes, turning token rows into
bridge-compressed hidden states for any number of jobs at once.

    Producer            (carryon_ray/producer.py, free of Ray) loads its base(s) once, knows each
                        job by its Calibration and embeds a list of requests, one base forward
                        per shape among them.
    EmbeddingProducer   the Ray actor around a Producer (actors/service.py creates them): requests
                        from every job queue up, fair across jobs (producer.FairQueue); each
                        forward takes as many as fit a padded-token budget, so rows of different
                        jobs share forward batches.

`calibrate` is a one-off remote task on the same node class that fits the bridges on a calibration
batch and reports the bases' fingerprints (a `Calibration`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time

from carryon_ray.config import BridgeConfig
from carryon_ray.embedding import ROW_INPUT_IDS, Calibration, calibrate as fit
from carryon_ray.producer import FairQueue, Producer, Request, load_bases

log = logging.getLogger("carryon.producer")


def calibrate(base_cfgs: list[dict], bridge_cfg: dict, shallow: list[int], rows: list[dict],
              tap_spec: tuple[int, int | None] = (0, None)) -> Calibration:
    """Fit the bridges on token `rows`; the Calibration every other process is built from (which
    state is the deep source: `tap_spec`, see carryon_ray.embedding.calibrate)."""
    return fit(load_bases(base_cfgs), BridgeConfig(**bridge_cfg), shallow, rows, tuple(tap_spec))


class JobForgotten(RuntimeError):
    """A request of a job that ended while it waited."""


class EmbeddingProducer:
    """A Producer as a Ray actor (async: many callers wait at once, one forward runs at a time).

    Every `embed` call queues; the forward loop takes the queue's head and whatever follows it that
    fits `max_batch_tokens` padded tokens, from any jobs, and runs them as one forward (by shape).
    The queue is fair across jobs (a job's backlog never holds another job's first request for
    long); a job that ends is forgotten, its waiting requests dropped. A request that raises is
    retried alone, so one job's bad batch fails only that job's call."""

    def __init__(self, base_cfgs: list[dict], only: int | None = None, max_batch_tokens: int = 4096):
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        self.producer = Producer(base_cfgs, only, node)
        self.max_batch_tokens = max_batch_tokens
        self.queue = FairQueue()  # of (Request, Future)
        self.wake: asyncio.Event | None = None
        self.arriving: dict[str, asyncio.Future] = {}
        # One thread runs the forwards: torch uses the actor's cores inside it.
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        # tokens are padded (what the forwards cost); first/last: when (wall clock) the first
        # forward started and the latest ended, so tokens over that span is the jobs' throughput
        self.stats = {"forwards": 0, "requests": 0, "rows": 0, "tokens": 0, "shared_forwards": 0, "jobs": 0,
                      "forgotten": 0, "first_forward_at": None, "last_forward_at": None}
        self.in_flight = 0  # embed calls not yet answered: queued, in a forward, or fetching a calibration

    def ready(self) -> str:
        return self.producer.node

    async def embed(self, job: str, calibration: list, batch: dict, last: bool = True) -> dict:
        """`batch`'s rows embedded for `job`. `calibration` is [an ObjectRef of the job's
        Calibration], fetched the first time this producer sees the job."""
        self.in_flight += 1
        try:
            return await self._embed(job, calibration, batch, last)
        finally:
            self.in_flight -= 1

    async def _embed(self, job: str, calibration: list, batch: dict, last: bool) -> dict:
        if not self.producer.knows(job):
            if job not in self.arriving:  # the job's first call fetches its calibration; others wait on it
                self.arriving[job] = asyncio.ensure_future(self._fetch(calibration[0]))
            try:
                calib = await self.arriving[job]
            finally:
                self.arriving.pop(job, None)
            if not self.producer.knows(job):
                self.producer.add_job(job, calib)
                self.stats["jobs"] += 1
        if self.wake is None:
            self.wake = asyncio.Event()
            asyncio.get_running_loop().create_task(self._forwards())
        done = asyncio.get_running_loop().create_future()
        req = Request(job, batch, last)
        self.queue.push(job, req.tokens(), (req, done))
        self.wake.set()
        return await done

    def forget(self, job: str) -> int:
        """`job` ended (or was cancelled): its waiting requests fail at once instead of running, and
        its calibration goes. Returns how many requests were dropped."""
        dropped = self.queue.forget(job)
        for _, fut in dropped:
            if not fut.done():
                fut.set_exception(JobForgotten(f"job {job} ended; its queued request was dropped"))
        self.producer.forget(job)
        self.stats["forgotten"] += len(dropped)
        return len(dropped)

    async def calibrate(self, bridge_cfg: dict, shallow: list[int], rows: list[dict],
                        tap_spec: tuple[int, int | None] = (0, None)) -> Calibration:
        """Producer.calibrate in the forward thread, between forwards."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, lambda: self.producer.calibrate(bridge_cfg, shallow, rows,
                                                                                     tap_spec))

    async def score_heldout(self, cfg_json: dict, files: dict[str, bytes]) -> dict | None:
        """Producer.score_heldout in the forward thread, between forwards."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, lambda: self.producer.score_heldout(cfg_json, files))

    @staticmethod
    async def _fetch(ref) -> Calibration:
        return ref if isinstance(ref, Calibration) else await ref

    def _take(self) -> list[tuple[Request, asyncio.Future]]:
        return self.queue.take(self.max_batch_tokens, keep=lambda item: not item[1].done())  # done: caller gone

    async def _forwards(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.queue:
                taken = self._take()
                if not taken:
                    break
                reqs = [r for r, _ in taken]
                if self.stats["first_forward_at"] is None:
                    self.stats["first_forward_at"] = time.time()
                try:
                    outs = await loop.run_in_executor(self.pool, self.producer.embed, reqs)
                    results = [(o, None) for o in outs]
                except Exception:  # noqa: BLE001 - find the request that raises; the others go on
                    results = []
                    for r in reqs:
                        try:
                            results.append(((await loop.run_in_executor(self.pool, self.producer.embed, [r]))[0],
                                            None))
                        except Exception as exc:  # noqa: BLE001 - that job's caller gets its error
                            results.append((None, exc))
                self.stats["forwards"] += 1
                self.stats["shared_forwards"] += len({r.job for r in reqs}) > 1
                self.stats["requests"] += len(reqs)
                self.stats["rows"] += sum(len(r.batch[ROW_INPUT_IDS]) for r in reqs)
                self.stats["tokens"] += sum(r.tokens() for r in reqs)
                self.stats["last_forward_at"] = time.time()
                for (_, fut), (out, exc) in zip(taken, results):
                    if fut.done():
                        continue
                    if exc is None:
                        fut.set_result(out)
                    else:
                        fut.set_exception(exc)

    def describe(self) -> dict:
        # forwards: the sets of requests taken together; base_forwards: the base forwards they ran as
        # (split by shape and length); tokens against forward_tokens: the padding merging added
        return {**self.stats, "base_forwards": self.producer.forwards, "forward_tokens": self.producer.forward_tokens,
                "node": self.producer.node, "queued": len(self.queue), "in_flight": self.in_flight}
