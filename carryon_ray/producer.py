"""A producer's model-side logic, free of Ray: the base(s) loaded once, every job known by its
Calibration, a list of requests (any jobs) embedded with one base forward per shape
(`carryon_ray.embedding.embed_many`). The producer actor (actors/embedder.py), a Serve model
replica that co-serves (serve/replica.py) and the benchmarks all run this class.
"""

from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .base import FrozenBase
from .config import BaseModelConfig, BridgeConfig
from .embedding import ROW_INPUT_IDS, ROW_NODES, ROW_SECONDS, Calibration, calibrate as fit, embed_many, is_code

JOBS_KEPT = 256  # calibrations a producer keeps (least recently used go first; a job re-sends its own)
# What one more forward costs, in padded tokens, when a producer splits the requests it took into
# forwards of similar lengths (`by_length`). On CPU a forward's cost is its tokens: SmolLM2 at one
# thread ran 342-384 tokens/s from an 8x17 to a 136x19 batch (bench/results/shared-producers.json,
# forward_rate_alone), so padding is pure loss. On a GPU a forward has a fixed cost (launches, the
# weights read once per forward), which this stands for: a short request rides along with long ones
# when splitting it off would save fewer padded tokens than this.
FORWARD_COST_TOKENS = 256


def load_bases(base_cfgs: list[dict]) -> list[FrozenBase]:
    return [FrozenBase.load(BaseModelConfig(**c)) for c in base_cfgs]


@dataclass
class Request:
    """One job's batch of token rows. `last`: the producer of the job's last base turns the rows
    into embedding rows; an earlier one (model mixing, a group per base) adds its base's codes and
    passes the token rows on."""

    job: str
    batch: dict
    last: bool = True

    def tokens(self) -> int:
        return padded_tokens([self])  # padded: what the forward costs


def padded_tokens(requests: list[Request]) -> int:
    """Padded tokens of one forward over `requests`: every row padded to the longest among them."""
    ids = [x for r in requests for x in r.batch[ROW_INPUT_IDS]]
    return len(ids) * max((len(x) for x in ids), default=0)


@dataclass(order=True)
class _Queued:
    start: float
    seq: int
    job: str = field(compare=False)
    tokens: int = field(compare=False)
    payload: object = field(compare=False)


class FairQueue:
    """The producer's waiting requests, fair across jobs (start-time fair queuing, by padded tokens).

    A request's start tag is max(the queue's virtual time, where its job's previous request ends);
    forwards take requests in tag order. So a job that queues a thousand requests gets its share and
    no more: a job arriving later is served within about one request of each job already waiting,
    not after the backlog, and a job that was idle gets no credit for the time it waited. Each job's
    own requests keep their order. Free of asyncio and Ray: the actor holds one, the tests drive it."""

    def __init__(self):
        self.items: list[_Queued] = []  # sorted by (start, seq)
        self.v = 0.0  # virtual time: the start tag of the last request taken
        self.ends: dict[str, float] = {}  # job -> where its last queued request ends
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self.items)

    def push(self, job: str, tokens: int, payload) -> None:
        start = max(self.v, self.ends.get(job, 0.0))
        self.ends[job] = start + max(1, tokens)
        bisect.insort(self.items, _Queued(start, next(self._seq), job, tokens, payload))
        if len(self.ends) > 4096:  # jobs whose last request ended before now carry no state worth keeping
            self.ends = {j: e for j, e in self.ends.items() if e > self.v}

    def take(self, budget: int, keep=lambda payload: True) -> list:
        """The next forward's payloads: in tag order while they fit `budget` tokens (the first one
        always); a payload `keep` refuses (its caller is gone) is dropped on the way."""
        taken, tokens = [], 0
        while self.items:
            head = self.items[0]
            if not keep(head.payload):
                self.items.pop(0)
                continue
            if taken and tokens + head.tokens > budget:
                break
            self.items.pop(0)
            self.v = head.start
            taken.append(head.payload)
            tokens += head.tokens
        return taken

    def forget(self, job: str) -> list:
        """Drop `job`'s waiting requests (it ended or was cancelled); returns their payloads."""
        mine = [q.payload for q in self.items if q.job == job]
        self.items = [q for q in self.items if q.job != job]
        self.ends.pop(job, None)
        return mine


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
        self.bases = bases if bases is not None else load_bases([base_cfgs[i] for i in self.indices])
        self.node = node
        self.jobs: OrderedDict[str, _Job] = OrderedDict()
        # base forwards run and their padded tokens (what they cost, against Request.tokens: what
        # each request alone would have cost)
        self.forwards, self.forward_tokens = 0, 0
        self.forward_cost = FORWARD_COST_TOKENS  # by_length's price of one more forward (a benchmark varies it)

    def forget(self, job: str) -> None:
        self.jobs.pop(job, None)

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

    def score_heldout(self, cfg_json: dict, files: dict[str, bytes]) -> dict | None:
        """A job's held-out comparison on this producer's loaded base(s): no base load of its own."""
        from .evaluation import score_heldout_files

        if self.indices != list(range(len(self.bases))):
            raise ValueError("a producer of one base among several cannot score a mixed-base adapter")
        return score_heldout_files(self.bases, cfg_json, files)

    def shape(self, req: Request) -> tuple:
        """What requests must share to share a forward: the layers it returns and where it stops."""
        j = self.jobs[req.job]
        return j.shallow, j.tap

    def embed(self, requests: list[Request]) -> list[dict]:
        """Each request's output rows: one base forward per shape among them, split further where
        their lengths differ enough that padding would cost more than another forward."""
        out: list[dict | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(self.shape(r), []).append(i)
        for (shallow, tap), same_shape in groups.items():
            for idx in by_length(same_shape, requests, self.forward_cost):
                self.forwards += 1
                self.forward_tokens += padded_tokens([requests[i] for i in idx])
                embedded = embed_many(self.bases, [(self.jobs[requests[i].job].bridges, requests[i].batch)
                                                   for i in idx], list(shallow), self.indices, self.node, tap)
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


def by_length(idx: list[int], requests: list[Request], forward_cost: int = FORWARD_COST_TOKENS) -> list[list[int]]:
    """`idx` (requests that share a forward's shape) split into forwards that waste the fewest
    padded tokens: ordered by their longest row, then cut where the padding a merged forward would
    add exceeds `forward_cost` per extra forward (exact, by dynamic programming over the cut points:
    a forward pads every row to the longest in it; ordered by length, some best split is a run of
    neighbours). Requests are never split, so each job's rows stay together."""
    if len(idx) < 2:
        return [idx]
    longest = {i: max((len(x) for x in requests[i].batch[ROW_INPUT_IDS]), default=0) for i in idx}
    order = sorted(idx, key=lambda i: longest[i])
    rows = [len(requests[i].batch[ROW_INPUT_IDS]) for i in order]
    # best[j]: (least cost, fewest forwards at it) of the first j requests; a forward over order[i:j]
    # pads to order[j-1]'s length
    best, cut = [(0, 0)] + [(float("inf"), 0)] * len(order), [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        n = 0
        for i in range(j - 1, -1, -1):
            n += rows[i]
            cost = (best[i][0] + n * longest[order[j - 1]] + forward_cost, best[i][1] + 1)
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out, j = [], len(order)
    while j > 0:
        out.append(order[cut[j]:j])
        j = cut[j]
    return out[::-1]
