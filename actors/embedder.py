"""Embedding producers: the frozen base(s) on inference-class nodes, turning token rows into
bridge-compressed hidden states for any number of jobs at once.

    Producer            plain Python: loads its base(s) once, knows each job by its Calibration
                        (bridges, shallow layers, tap), and embeds a list of requests, one base
                        forward per group of requests that share the forward's shape
                        (`carryon_ray.embedding.embed_many`). No Ray in it: the bench calls it too.
    EmbeddingProducer   the Ray actor around a Producer (actors/service.py creates them): requests
                        from every job queue up; each forward takes as many as fit a padded-token
                        budget, so rows of different jobs share forward batches.

`calibrate` is a one-off remote task on the same node class that fits the bridges on a calibration
batch and reports the bases' fingerprints (a `Calibration`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from carryon_ray.base import FrozenBase
from carryon_ray.config import BaseModelConfig, BridgeConfig
from carryon_ray.embedding import (ROW_INPUT_IDS, ROW_NODES, ROW_SECONDS, Calibration, calibrate as fit, embed_many,
                                   is_code)

log = logging.getLogger("carryon.producer")

JOBS_KEPT = 256  # calibrations a producer keeps (least recently used go first; a job re-sends its own)


def _load_bases(base_cfgs: list[dict]) -> list[FrozenBase]:
    return [FrozenBase.load(BaseModelConfig(**c)) for c in base_cfgs]


def calibrate(base_cfgs: list[dict], bridge_cfg: dict, shallow: list[int], rows: list[dict],
              tap_spec: tuple[int, int | None] = (0, None)) -> Calibration:
    """Fit the bridges on token `rows`; the Calibration every other process is built from (which
    state is the deep source: `tap_spec`, see carryon_ray.embedding.calibrate)."""
    return fit(_load_bases(base_cfgs), BridgeConfig(**bridge_cfg), shallow, rows, tuple(tap_spec))


@dataclass
class Request:
    """One job's batch of token rows. `last`: the producer of the job's last base turns the rows
    into embedding rows; an earlier one (model mixing, a group per base) adds its base's codes and
    passes the token rows on."""

    job: str
    batch: dict
    last: bool = True

    def tokens(self) -> int:
        ids = self.batch[ROW_INPUT_IDS]
        return len(ids) * max((len(i) for i in ids), default=0)  # padded: what the forward costs


@dataclass
class _Job:
    bridges: list
    shallow: tuple[int, ...]
    tap: int | None


class Producer:
    """The base(s) of one producer and what it knows of each job. With `only=b` it loads and runs
    base b alone (model mixing with a group of producers per base)."""

    def __init__(self, base_cfgs: list[dict], only: int | None = None, node: str = "",
                 bases: list[FrozenBase] | None = None):
        self.indices = list(range(len(base_cfgs))) if only is None else [only]
        # `bases`: already loaded (a Serve replica's, co-serving), else loaded here
        self.bases = bases if bases is not None else _load_bases([base_cfgs[i] for i in self.indices])
        self.node = node
        self.jobs: OrderedDict[str, _Job] = OrderedDict()

    def knows(self, job: str) -> bool:
        if job in self.jobs:
            self.jobs.move_to_end(job)
            return True
        return False

    def add_job(self, job: str, calibration: Calibration) -> None:
        bridges = calibration.bridges()
        self.jobs[job] = _Job([bridges[i] for i in self.indices], tuple(calibration.shallow), calibration.tap)
        while len(self.jobs) > JOBS_KEPT:
            self.jobs.popitem(last=False)

    def register(self, job: str, calibration) -> None:
        if not self.knows(job):
            self.add_job(job, calibration)

    def calibrate(self, bridge_cfg: dict, shallow: list[int], rows: list[dict],
                  tap_spec: tuple[int, int | None] = (0, None)) -> Calibration:
        """`calibrate` on this producer's loaded base(s): a job's calibration costs no base load."""
        if self.indices != list(range(len(self.bases))):
            raise ValueError("a producer of one base among several cannot calibrate the job's bridges")
        return fit(self.bases, BridgeConfig(**bridge_cfg), shallow, rows, tuple(tap_spec))

    def shape(self, req: Request) -> tuple:
        """What requests must share to share a forward: the layers it returns and where it stops."""
        j = self.jobs[req.job]
        return j.shallow, j.tap

    def embed(self, requests: list[Request]) -> list[dict]:
        """Each request's output rows, one base forward per shape among them."""
        out: list[dict | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(self.shape(r), []).append(i)
        for (shallow, tap), idx in groups.items():
            embedded = embed_many(self.bases, [(self.jobs[requests[i].job].bridges, requests[i].batch) for i in idx],
                                  list(shallow), self.indices, self.node, tap)
            for i, mine in zip(idx, embedded):
                out[i] = self._rows(requests[i], mine)
        return out

    def _rows(self, req: Request, mine: dict) -> dict:
        batch = req.batch
        seconds = mine[ROW_SECONDS] + np.asarray(batch.get(ROW_SECONDS, 0.0))  # time of earlier producers too
        if ROW_NODES in batch:
            mine[ROW_NODES] = np.array([f"{prev},{self.node}" for prev in batch[ROW_NODES]], dtype=object)
        if req.last:  # what the trainers read: embedding rows with the codes of every base
            out = {k: v for k, v in batch.items() if is_code(k)}
            out.update(mine)
        else:  # pass the token rows on to the next base's producers, with this base's codes
            out = dict(batch)
            out.update({k: v for k, v in mine.items() if is_code(k) or k == ROW_NODES})
        out[ROW_SECONDS] = seconds
        return out


class EmbeddingProducer:
    """A Producer as a Ray actor (async: many callers wait at once, one forward runs at a time).

    Every `embed` call queues; the forward loop takes the queue's head and whatever follows it that
    fits `max_batch_tokens` padded tokens, from any jobs, and runs them as one forward (by shape).
    A request that raises is retried alone, so one job's bad batch fails only that job's call."""

    def __init__(self, base_cfgs: list[dict], only: int | None = None, max_batch_tokens: int = 4096):
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        self.producer = Producer(base_cfgs, only, node)
        self.max_batch_tokens = max_batch_tokens
        self.queue: list[tuple[Request, asyncio.Future]] = []
        self.wake: asyncio.Event | None = None
        self.arriving: dict[str, asyncio.Future] = {}
        # One thread runs the forwards: torch uses the actor's cores inside it.
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self.stats = {"forwards": 0, "requests": 0, "rows": 0, "tokens": 0, "shared_forwards": 0, "jobs": 0}

    def ready(self) -> str:
        return self.producer.node

    async def embed(self, job: str, calibration: list, batch: dict, last: bool = True) -> dict:
        """`batch`'s rows embedded for `job`. `calibration` is [an ObjectRef of the job's
        Calibration], fetched the first time this producer sees the job."""
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
        self.queue.append((Request(job, batch, last), done))
        self.wake.set()
        return await done

    async def calibrate(self, bridge_cfg: dict, shallow: list[int], rows: list[dict],
                        tap_spec: tuple[int, int | None] = (0, None)) -> Calibration:
        """Producer.calibrate in the forward thread, between forwards."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, lambda: self.producer.calibrate(bridge_cfg, shallow, rows,
                                                                                     tap_spec))

    @staticmethod
    async def _fetch(ref) -> Calibration:
        return ref if isinstance(ref, Calibration) else await ref

    def _take(self) -> list[tuple[Request, asyncio.Future]]:
        taken, tokens = [], 0
        while self.queue:
            req, fut = self.queue[0]
            if fut.cancelled():  # its caller is gone
                self.queue.pop(0)
                continue
            if taken and tokens + req.tokens() > self.max_batch_tokens:
                break
            taken.append(self.queue.pop(0))
            tokens += req.tokens()
        return taken

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
                for (_, fut), (out, exc) in zip(taken, results):
                    if fut.done():
                        continue
                    if exc is None:
                        fut.set_result(out)
                    else:
                        fut.set_exception(exc)

    def describe(self) -> dict:
        return {**self.stats, "node": self.producer.node, "queued": len(self.queue)}
