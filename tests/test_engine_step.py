"""One engine step: the scheduler's plan (tested without a model, with a hand-made runner), and the
flat forward that runs a plan's decode tokens and prompt chunks through the base at once."""

import random

import pytest
import torch

from carryon_ray.engine.scheduler import Request, Scheduler
from test_invariants import random_carryon
from test_recycled import deep_base, deep_dir, recycled  # noqa: F401 - module fixtures used here


# -- the scheduler, without a model ---------------------------------------------------------------


class HandRunner:
    """Stands in for the model runner and sampler: every decode row and every prompt-completing chunk
    gets token 7; the scheduler is told what the engine would tell it."""

    def __init__(self, sched: Scheduler):
        self.sched, self.swaps = sched, []
        sched.on_swap = lambda i, j, upto: self.swaps.append((i, j))

    def step(self):
        plan = self.sched.schedule()
        # the plan's decode rows hold slots 0..d-1, where the runner reads them in place
        assert [s.slot for s in plan.decode] == list(range(len(plan.decode)))
        for seq in plan.decode:
            seq.fed += 1
        for c in plan.prefill:
            seq = c.seq
            assert c.start == seq.fed
            seq.fed += len(c.tokens)
        for seq in [*plan.decode, *(c.seq for c in plan.prefill if c.completes_prompt)]:
            self.sched.update(seq, 7)  # the scheduler finishes the row (max_tokens here) and frees its slot
        ended = self.sched.take_finished()
        assert all(s.slot == -1 and s.done for s in ended)
        return plan, ended


def check_slots(sched: Scheduler):
    assert [s.slot for s in sched.rows] == list(range(len(sched.rows)))
    assert all(s.decoding for s in sched.rows[: sched.decoding])
    assert not any(s.decoding for s in sched.rows[sched.decoding :])


def test_decode_rows_come_first_and_prompt_tokens_stay_within_the_budget():
    sched = Scheduler(max_rows=6, prefill_tokens=10, max_len=4096)
    run = HandRunner(sched)
    rng = random.Random(0)
    seqs = [sched.submit(Request(list(range(rng.randint(1, 30))), max_tokens=rng.randint(1, 12))) for _ in range(20)]
    while sched.has_work():
        decoding_before = {s.id for s in sched.rows if s.decoding}
        plan, _ = run.step()
        assert sum(len(c.tokens) for c in plan.prefill) <= 10
        # every row that was decoding (and was not retired) decodes this step: no prefill delays it
        assert decoding_before - {s.id for s in plan.finished} <= {s.id for s in plan.decode}
        assert len(sched.rows) <= 6
        check_slots(sched)
    assert all(s.finish_reason == "length" and len(s.tokens) == s.request.max_tokens for s in seqs)


def test_a_long_prompt_is_not_starved_by_arrivals():
    sched = Scheduler(max_rows=8, prefill_tokens=64, max_len=4096)
    run = HandRunner(sched)
    long = sched.submit(Request(list(range(1000)), max_tokens=2))
    steps = 0
    while not long.decoding:
        sched.submit(Request([1, 2, 3], max_tokens=50))  # a short prompt arrives at every step
        plan, _ = run.step()
        steps += 1
        assert plan.prefill and plan.prefill[0].seq is long  # admitted first, fed first
    assert steps == -(-1000 // 64)  # every step fed it a full budget


def test_prompt_budget_shrinks_while_rows_decode():
    sched = Scheduler(max_rows=4, prefill_tokens=100, max_len=4096, prefill_tokens_decoding=8)
    run = HandRunner(sched)
    first = sched.submit(Request(list(range(60)), max_tokens=50))
    plan, _ = run.step()
    assert [len(c.tokens) for c in plan.prefill] == [60]  # nothing decodes: the whole budget
    late = sched.submit(Request(list(range(30)), max_tokens=2))
    fed = []
    while not late.decoding:
        plan, _ = run.step()
        assert first in plan.decode
        fed.append(sum(len(c.tokens) for c in plan.prefill))
    assert fed == [8, 8, 8, 6]  # a row decodes: at most prefill_tokens_decoding per step


def test_retiring_a_row_frees_its_slot_for_the_next_step():
    sched = Scheduler(max_rows=3, prefill_tokens=100, max_len=4096)
    run = HandRunner(sched)
    a, b, c = (sched.submit(Request([1, 2], max_tokens=100)) for _ in range(3))
    waiting = sched.submit(Request([4, 5, 6], max_tokens=100))
    run.step()
    assert len(sched.rows) == 3 and waiting.slot == -1
    a.cancel()
    plan, _ = run.step()
    assert a in plan.finished and a.finish_reason == "cancelled" and a.slot == -1
    assert waiting in plan.admitted and waiting.slot >= 0 and a not in plan.decode
    check_slots(sched)
    b.stop()  # a completed stop string: ends as "stop" at the next step
    plan, _ = run.step()
    assert b in plan.finished and b.finish_reason == "stop"
    check_slots(sched)


def test_timeouts_and_impossible_requests_end_before_the_forward():
    sched = Scheduler(max_rows=4, prefill_tokens=8, max_len=16)
    late = sched.submit(Request([1, 2], max_tokens=4, deadline=0.0))
    big = sched.submit(Request(list(range(10)), max_tokens=10))
    empty = sched.submit(Request([], max_tokens=1))
    plan = sched.schedule(now=1.0)
    assert late.finish_reason == "timeout" and big.finish_reason == "error" and empty.finish_reason == "error"
    assert "exceeds the context of 16" in big.error and plan.empty and not sched.rows


# -- the flat forward -------------------------------------------------------------------------------


def test_one_flat_forward_gives_each_row_its_own_logits(deep_dir, deep_base):  # noqa: F811
    """Decode rows and prompt chunks at mixed positions, of a bare-base row, an MLP carry-on reading a
    shallow layer, a transformer carry-on with its own cache and two recycled-top adapters, in ONE base
    forward per step: every row's logits equal the full forward of its own context (fp32, <= 1e-5)."""
    from carryon_ray.bridge import Bridge
    from carryon_ray.engine import Engine
    from carryon_ray.generation import Adapter, CarryOnModel

    base = deep_base
    mlp = Adapter(random_carryon(base, "mlp"), [[Bridge(0), Bridge(0)]], [0], {}).attach(base)
    tr = Adapter(random_carryon(base, "transformer", shallow=()), [[Bridge(0)]], [], {}).attach(base)
    recs = []
    for seed, depth in ((1, 2), (2, 3)):
        _, m = recycled(deep_dir, base, depth=depth, seed=seed, noise=0.2)
        m.set_alpha(0.8)
        recs.append(Adapter(m, [[Bridge(0)]], [], {}).attach(base))
    adapters = [None, mlp, tr, recs[0], recs[1], recs[0]]
    engine = Engine(base, max_rows=8, prefill_tokens=9)
    assert engine.flat
    seen, plans = [], []
    sampler, schedule = engine.sampler, engine.scheduler.schedule

    def record(seqs, logits):
        seen.extend((s, s.fed, logits[j].clone()) for j, s in enumerate(seqs))
        return sampler(seqs, logits)

    def plan_and_keep():
        p = schedule()
        plans.append((len(p.decode), len(p.prefill)))
        return p

    engine.sampler, engine.scheduler.schedule = record, plan_and_keep
    rng = random.Random(3)
    prompts = [[rng.randrange(100, base.vocab_size) for _ in range(n)] for n in (5, 14, 3, 20, 8, 11)]
    seqs = []
    for i, (p, a) in enumerate(zip(prompts, adapters)):  # arrivals while others decode
        seqs.append(engine.submit(Request(p, a, max_tokens=4 + i, stop_at_eos=False)))
        engine.step()
    while engine.has_work():
        engine.step()
    assert any(d and p for d, p in plans), "no step mixed decode tokens and prompt chunks"
    assert engine.stats.forwards == sum(1 for d, p in plans if d or p)  # one base forward per step
    worst = 0.0
    for seq, fed, got in seen:
        context = (seq.request.prompt + seq.tokens)[:fed]
        model = CarryOnModel([base])
        model.adapter = seq.request.adapter
        want = model.logits(torch.tensor([context]))[0, -1].float()
        worst = max(worst, float((got - want).abs().max()))
    assert len(seen) == sum(s.request.max_tokens for s in seqs)
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("which", ["smol_fp32", "smol_bf16"])
def test_the_flat_layer_loop_is_hugging_face_s_forward(request, which):
    """SmolLM2's own modules, run by the layer loop over a flat batch (a prompt in two chunks, the
    second starting mid-prompt, beside a second row), give Hugging Face's logits."""
    from carryon_ray.engine.kv import KVPool
    from carryon_ray.engine.flat import FlatBatch, LayerLoop

    base = request.getfixturevalue(which)
    tok = base.tokenizer
    ids = tok("The quick brown fox jumps over the lazy dog because", return_tensors="pt")["input_ids"][0]
    other = tok("Once upon a time", return_tensors="pt")["input_ids"][0]
    hf = base.model(ids[None]).logits[0].float()
    hf_other = base.model(other[None]).logits[0].float()
    loop, pool = LayerLoop(base), KVPool(512)
    first = loop.forward(FlatBatch.build([], [(0, 0, ids[:6].tolist())]), pool)[0]
    both = loop.forward(FlatBatch.build([], [(0, 6, ids[6:].tolist()), (1, 0, other.tolist())]), pool)[0]
    ours = torch.nn.functional.linear(torch.cat([first, both[: len(ids) - 6]]), base.head_weight).float()
    ours_other = torch.nn.functional.linear(both[len(ids) - 6 :], base.head_weight).float()
    if base.dtype == torch.float32:
        assert float((ours - hf).abs().max()) <= 1e-4 and float((ours_other - hf_other).abs().max()) <= 1e-4
    else:
        # bf16 against the fp32 reference (not against HF's bf16, whose argmax flips at exact bf16 ties):
        # our rounding error is of the size of HF's own bf16 error, and every token not at a near-tie agrees
        ref = request.getfixturevalue("smol_fp32").model(ids[None]).logits[0].float()
        ours_err, hf_err = float((ours - ref).abs().max()), float((hf - ref).abs().max())
        assert ours_err <= 1.5 * hf_err + 0.05, (ours_err, hf_err)
        top = ref.topk(2, -1).values
        clear = (top[:, 0] - top[:, 1]) > hf_err
        assert clear.sum() >= 4 and torch.equal(ours.argmax(-1)[clear], ref.argmax(-1)[clear])
