"""The producer service (actors/service.py, actors/embedder.py): jobs' rows share base forwards,
each job gets exactly its rows back, encoded with its own bridges, whatever dies or misbehaves."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from carryon_ray.bridge import Bridge
from carryon_ray.config import BridgeConfig
from carryon_ray.embedding import (ROW_ID, ROW_INPUT_IDS, ROW_LENGTH, ROW_REPLAY, Calibration, calibrate, decode_sources,
                                   embed_many, embed_rows, from_rows, part_layout, row_batches)


def _rows(seed: int, n: int, first_id: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 24, (n,), generator=g).tolist()
    ids = [torch.randint(5, 500, (k,), generator=g).tolist() for k in lengths]
    return {ROW_ID: list(range(first_id, first_id + n)), ROW_REPLAY: [False] * n, ROW_INPUT_IDS: ids,
            "labels": [[-100] + x[1:] for x in ids]}


def _decoded(out: dict, bridges, dims) -> torch.Tensor:
    (batch,) = row_batches(out, len(out[ROW_ID]))
    got = from_rows(batch, part_layout(bridges, dims, torch.float32))
    return decode_sources(bridges, got.enc, dims)[0][0][got.attention_mask.bool()]


def test_jobs_sharing_a_forward_get_what_each_would_get_alone(tiny_base):
    """Two jobs with different bridges (8 bits and none) in one base forward: each job's rows come
    back with its ids, lengths and codes as its batch alone gives them."""
    torch.manual_seed(0)
    a = [[Bridge.from_config(BridgeConfig(bits=8), torch.randn(256, 64))]]
    b = [[Bridge.from_config(BridgeConfig(bits=0), torch.randn(256, 64))]]
    rows_a, rows_b = _rows(1, 5), _rows(2, 3, first_id=100)
    shared = embed_many([tiny_base], [(a, rows_a), (b, rows_b)], [])
    for bridges, rows, out in ((a, rows_a, shared[0]), (b, rows_b, shared[1])):
        alone = embed_rows([tiny_base], bridges, rows, [])
        assert out[ROW_ID].tolist() == rows[ROW_ID]
        assert out[ROW_LENGTH].tolist() == [len(x) for x in rows[ROW_INPUT_IDS]]
        got, want = _decoded(out, bridges, [[64]]), _decoded(alone, bridges, [[64]])
        assert got.shape == want.shape
        # a padded batch of other rows moves a state by float rounding at most: an 8-bit code by a step
        torch.testing.assert_close(got, want, rtol=0, atol=0.05 * float(want.abs().max()))


def _partitions(items: list) -> list[list[list]]:
    if not items:
        return [[]]
    first, rest = items[0], items[1:]
    out = []
    for part in _partitions(rest):
        out.append([[first], *part])
        for k in range(len(part)):
            out.append(part[:k] + [[first, *part[k]]] + part[k + 1:])
    return out


def test_a_producer_splits_the_requests_it_takes_into_forwards_of_similar_length():
    """by_length finds the cheapest split (padded tokens plus a cost per forward) among every way of
    splitting the requests, never splits a request, and keeps equal lengths in one forward."""
    from carryon_ray.producer import Request, by_length

    def cost(groups, reqs, c):
        return sum(sum(len(reqs[i].batch[ROW_INPUT_IDS]) for i in g)
                   * max(len(x) for i in g for x in reqs[i].batch[ROW_INPUT_IDS]) + c for g in groups)

    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        k = int(torch.randint(1, 7, (1,), generator=g))
        reqs = [Request("j", {ROW_INPUT_IDS: [[1] * int(n) for n in torch.randint(1, 80, (int(torch.randint(1, 6, (1,), generator=g)),),
                                                                                 generator=g)]}) for _ in range(k)]
        c = [0, 64, 256, 10_000][trial % 4]
        got = by_length(list(range(k)), reqs, c)
        assert sorted(i for grp in got for i in grp) == list(range(k))  # every request once, whole
        assert cost(got, reqs, c) == min(cost(p, reqs, c) for p in _partitions(list(range(k))))
    same = [Request("j", {ROW_INPUT_IDS: [[1] * 20] * 4}) for _ in range(5)]
    assert by_length(list(range(5)), same, 0) == [[0, 1, 2, 3, 4]]


def test_short_and_long_requests_run_as_separate_forwards_and_get_their_own_rows(tiny_base):
    """Short requests of one job and long ones of another, taken together: the producer runs them
    as two base forwards (no short row padded to a long one) and each job gets its rows as alone."""
    from carryon_ray.producer import Producer, Request

    torch.manual_seed(0)
    calib_rows = [{ROW_ID: i, ROW_REPLAY: False, ROW_INPUT_IDS: x, "labels": x}
                  for i, x in enumerate(_rows(9, 8)[ROW_INPUT_IDS])]
    producer = Producer([{"name": "tiny", "dtype": "float32"}], bases=[tiny_base])
    for job in ("short", "long"):
        producer.add_job(job, calibrate([tiny_base], BridgeConfig(bits=8), [], calib_rows))

    def rows(seed, n, length, first):
        g = torch.Generator().manual_seed(seed)
        ids = [torch.randint(5, 500, (length,), generator=g).tolist() for _ in range(n)]
        return {ROW_ID: list(range(first, first + n)), ROW_REPLAY: [False] * n, ROW_INPUT_IDS: ids,
                "labels": [[-100] + x[1:] for x in ids]}

    reqs = [Request("short", rows(1, 8, 6, 0)), Request("long", rows(2, 8, 120, 100)),
            Request("short", rows(3, 8, 7, 200)), Request("long", rows(4, 4, 118, 300))]
    outs = producer.embed(reqs)
    assert producer.forwards == 2
    assert producer.forward_tokens == 16 * 7 + 12 * 120  # against 28 x 120 in one forward
    for req, out in zip(reqs, outs):
        alone = Producer([{"name": "tiny", "dtype": "float32"}], bases=[tiny_base])
        alone.jobs = producer.jobs
        (want,) = alone.embed([req])
        assert out[ROW_ID].tolist() == req.batch[ROW_ID] == want[ROW_ID].tolist()
        bridges = producer.jobs[req.job].bridges
        got, exp = _decoded(out, bridges, [[64]]), _decoded(want, bridges, [[64]])
        torch.testing.assert_close(got, exp, rtol=0, atol=0.05 * float(exp.abs().max()))


def test_queued_requests_of_several_jobs_share_one_forward_under_the_token_budget(tiny_dir, tiny_base):
    """The producer actor's loop (run here without Ray): requests of two jobs queued together go
    through one forward up to max_batch_tokens; the next request waits for the next forward; a
    job whose bridges do not fit the base fails alone and the others get their rows."""
    import asyncio

    from actors.embedder import EmbeddingProducer

    calib_rows = [{ROW_ID: i, ROW_REPLAY: False, ROW_INPUT_IDS: x, "labels": x}
                  for i, x in enumerate(_rows(9, 8)[ROW_INPUT_IDS])]
    calibs = {job: calibrate([tiny_base], BridgeConfig(bits=bits), [], calib_rows) for job, bits in (("a", 8), ("b", 4))}
    calibs["bad"] = _misfit(calibrate([tiny_base], BridgeConfig(bits=8), [], calib_rows))
    producer = EmbeddingProducer([{"name": tiny_dir, "dtype": "float32"}], None, max_batch_tokens=3 * 4 * 23)
    batches = [("a", _rows(1, 4)), ("b", _rows(2, 4, 100)), ("bad", _rows(3, 4, 200)), ("a", _rows(4, 4, 300))]

    async def main():
        return await asyncio.gather(*(producer.embed(job, [calibs[job]], rows) for job, rows in batches),
                                    return_exceptions=True)

    t0 = time.time()
    outs = asyncio.run(main())
    t1 = time.time()
    for (job, rows), out in zip(batches, outs):
        if job == "bad":
            assert isinstance(out, Exception), out
        else:
            assert out[ROW_ID].tolist() == rows[ROW_ID], job
    # three requests of at most 4 x 23 padded tokens fit the budget: a, b and bad shared the first
    # forward (which raised, so each ran again alone); the fourth came in the next
    assert producer.stats["shared_forwards"] >= 1 and producer.stats["requests"] >= 4, producer.stats
    # the span its forwards ran in (tokens over it: the jobs' throughput, bench/shared_producers.py)
    assert t0 <= producer.stats["first_forward_at"] <= producer.stats["last_forward_at"] <= t1, producer.stats


def test_the_queue_is_fair_across_jobs_and_keeps_each_jobs_order():
    """Start-time fair queuing, without a model: a job arriving behind another's backlog is served
    within one request, not after it; a job's own requests keep their order; equal shares of
    tokens, not of requests, when sizes differ; an idle job earns no credit; a forgotten job's
    requests leave the queue."""
    from carryon_ray.producer import FairQueue

    q = FairQueue()
    for i in range(6):
        q.push("big", 100, ("big", i))
    q.push("small", 100, ("small", 0))
    order = [q.take(100)[0] for _ in range(7)]  # one request per forward
    assert order.index(("small", 0)) <= 1, order
    assert [x for x in order if x[0] == "big"] == [("big", i) for i in range(6)]
    # By tokens: a job of 50-token requests gets two for each 100-token request of the other.
    for i in range(4):
        q.push("wide", 100, ("wide", i))
    for i in range(8):
        q.push("narrow", 50, ("narrow", i))
    taken = [q.take(1)[0][0] for _ in range(12)]
    assert taken[:6].count("narrow") == 4 and taken[:6].count("wide") == 2, taken
    # Idle credit: "late" sat idle while "busy" ran 10 forwards; it is served next, then they alternate.
    for i in range(10):
        q.push("busy", 10, ("busy", i))
    for _ in range(5):
        q.take(10)
    q.push("late", 10, ("late", 0))
    q.push("late", 10, ("late", 1))
    nxt = [q.take(10)[0][0] for _ in range(4)]
    assert nxt.count("late") == 2 and nxt.count("busy") == 2, nxt
    # Budget: several requests per forward while they fit; the first always, even when larger.
    q = FairQueue()
    q.push("x", 300, "x0")
    q.push("y", 30, "y0")
    q.push("y", 30, "y1")
    assert q.take(100) == ["x0"] and q.take(100) == ["y0", "y1"]
    # forget: a job's waiting requests go, the others stay in their order.
    q = FairQueue()
    for job in ("a", "b", "a", "b"):
        q.push(job, 10, job)
    assert q.forget("a") == ["a", "a"] and q.take(1000) == ["b", "b"] and len(q) == 0


def test_a_forgotten_job_s_waiting_requests_fail_at_once_and_others_run(tiny_dir, tiny_base):
    """The producer actor's loop (without Ray): a job that ends while its requests wait behind a
    forward is forgotten; its callers get JobForgotten instead of rows, the other job gets its rows."""
    import asyncio

    from actors.embedder import EmbeddingProducer, JobForgotten

    calib_rows = [{ROW_ID: i, ROW_REPLAY: False, ROW_INPUT_IDS: x, "labels": x}
                  for i, x in enumerate(_rows(9, 8)[ROW_INPUT_IDS])]
    calib = calibrate([tiny_base], BridgeConfig(bits=8), [], calib_rows)
    producer = EmbeddingProducer([{"name": tiny_dir, "dtype": "float32"}], None, max_batch_tokens=1)  # one per forward

    hold = threading.Event()
    producer.pool.submit(hold.wait)  # the forward thread is busy: one request is taken, the rest wait

    async def main():
        keep = [asyncio.ensure_future(producer.embed("keep", [calib], _rows(i, 2, 10 * i))) for i in range(2)]
        gone = [asyncio.ensure_future(producer.embed("gone", [calib], _rows(5 + i, 2))) for i in range(4)]
        for _ in range(500):
            if len(producer.queue) == 5:
                break
            await asyncio.sleep(0.01)
        dropped = producer.forget("gone")
        hold.set()
        return dropped, await asyncio.gather(*keep, *gone, return_exceptions=True)

    dropped, outs = asyncio.run(main())
    assert dropped >= 3 and producer.stats["forgotten"] == dropped
    assert all(isinstance(o, dict) for o in outs[:2]), outs[:2]
    assert sum(isinstance(o, JobForgotten) for o in outs[2:]) == dropped
    assert not producer.producer.knows("gone")


def _misfit(calib: Calibration) -> Calibration:
    """A calibration whose bridges expect states twice the base's width."""
    calib.bridge_tensors = {k: np.concatenate([v, v], axis=-1) if v.ndim else v for k, v in calib.bridge_tensors.items()}
    calib.hidden_sizes = [2 * h for h in calib.hidden_sizes]
    return calib


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, resources={"inference_node": 4}, include_dashboard=False,
             logging_level="WARNING")
    yield ray
    ray.shutdown()


def test_two_jobs_through_one_service_lose_and_duplicate_nothing(ray_local, tiny_dir, tiny_base):
    """Two jobs embed at once through one service while its producers are killed mid-run: each job
    gets every row exactly once, in order, and a third job whose calibration does not fit the base
    fails alone."""
    import ray

    from actors.service import NAMESPACE, ProducerService, embed_through_producers

    torch.manual_seed(0)
    calib_rows = [{ROW_ID: i, ROW_REPLAY: False, ROW_INPUT_IDS: x, "labels": x}
                  for i, x in enumerate(_rows(9, 8)[ROW_INPUT_IDS])]
    base_cfg = {"name": tiny_dir, "dtype": "float32"}
    calibs = {job: calibrate([tiny_base], BridgeConfig(bits=bits), [], calib_rows) for job, bits in (("a", 8), ("b", 4))}
    calibs["bad"] = _misfit(calibrate([tiny_base], BridgeConfig(bits=8), [], calib_rows))
    refs = {job: ray.put(c) for job, c in calibs.items()}
    service = ray.remote(ProducerService).options(name="test-producers", namespace=NAMESPACE, num_cpus=0,
                                                  max_concurrency=64).remote(
        [base_cfg], [None], 1, 2, {"num_cpus": 0.5, "num_gpus": 0, "resources": {"inference_node": 1}}, 512, "test")
    task = ray.remote(num_cpus=0)(embed_through_producers)
    blocks = {job: [_rows(10 * k + i, 4, first_id=1000 * k + 4 * i) for i in range(24)]
              for k, job in enumerate(("a", "b"), start=1)}
    outs: dict[str, list] = {}
    more = threading.Event()  # the jobs send their first 6 blocks, then wait for the producers to be busy

    def run(job):  # what a job's Ray Data stage does: a few blocks in flight, results in block order
        refs_, window = [], []
        for k, blk in enumerate(blocks[job]):
            if k == 6:
                more.wait(120)
            if len(window) == 3:
                _, window = ray.wait(window, num_returns=1)
            refs_.append(task.remote(blk, "test-producers", job, [refs[job]], None, True, 2))
            window.append(refs_[-1])
        outs[job] = ray.get(refs_, timeout=300)

    threads = [threading.Thread(target=run, args=(job,)) for job in blocks]
    for t in threads:
        t.start()
    bad = task.remote(_rows(77, 4), "test-producers", "bad", [refs["bad"]], None, True, 2)
    while ray.get(service.describe.remote())["calls"] < 12:  # producers warm, most blocks still to come
        time.sleep(0.2)
    victims = ray.get(service.__ray_call__.remote(lambda s: s.producers[None]))
    # Each producer's one forward thread is kept busy by a long calibration (about a second), so
    # the jobs' next requests wait in the producers when the kill lands: it always hits calls in
    # flight, however fast the tiny base embeds.
    long_rows = [{ROW_ID: i, ROW_REPLAY: False, ROW_INPUT_IDS: list(range(5, 133)), "labels": list(range(5, 133))}
                 for i in range(1000)]
    busy = [v.calibrate.remote({"bits": 8}, [], long_rows) for v in victims]
    more.set()
    deadline = time.time() + 60
    while time.time() < deadline and not any(ray.get(v.describe.remote())["in_flight"] for v in victims):
        time.sleep(0.01)  # until a producer holds a call (queued behind the calibration): the kill lands on it
    assert time.time() < deadline, "no call was ever in flight"
    for victim in victims:  # every producer, mid-call
        ray.kill(victim, no_restart=False)
    for t in threads:
        t.join()
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(busy, timeout=60)  # the calibrations died with their producers
    for job in blocks:
        ids = [int(x) for out in outs[job] for x in out[ROW_ID]]
        want = [x for blk in blocks[job] for x in blk[ROW_ID]]
        assert sorted(ids) == sorted(want) and len(ids) == len(set(ids)), job  # none lost, none twice
        assert ids == want  # and each block's rows in its order
    with pytest.raises(ray.exceptions.RayTaskError):
        ray.get(bad, timeout=120)
    time.sleep(1.0)  # the tasks' release calls reach the service on their own (fire and forget)
    seen = ray.get(service.describe.remote())
    assert seen["failures"] >= 1, seen  # the kill landed on calls in flight
    assert seen["in_use"] == 0, seen  # every call released its producer, the bad job's failed ones too
    ray.get(service.stop.remote())
    ray.kill(service)
