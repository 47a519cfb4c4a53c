"""One user's adapter never fails another user's request.

Rows of the bare base, MLP and transformer carry-ons (the latter with its own KV cache) and
recycled-top adapters of different ranks and depths share every engine step; rows join, leave, are
cancelled, stopped and timed out; one adapter's forward raises. Every other row's tokens equal its
adapter decoded alone, the raising adapter's rows end with its reason, every ended row is handed
out exactly once, and all KV memory is free when the engine idles."""

import gc
import random
import threading
import time

import pytest
import torch

from carryon_ray.bridge import Bridge
from carryon_ray.engine import Engine, Request
from carryon_ray.generation import Adapter, generate_mixed
from carryon_ray.model import CarryOn
from conftest import make_config
from test_invariants import random_carryon
from test_recycled import deep_base, deep_dir, recycled  # noqa: F401 - module fixtures used here


def rec(deep_dir, base, depth, rank, seed, alpha=0.8):  # noqa: F811
    _, m = recycled(deep_dir, base, depth=depth, rank=rank, seed=seed, noise=0.2)
    m.set_alpha(alpha)
    return Adapter(m, [[Bridge(0)]], [], {}).attach(base)


def transformer(base, width=32, seed=1):
    cfg = make_config(carryon={"kind": "transformer", "width": width, "heads": 4, "kv_heads": 2})
    torch.manual_seed(seed)
    m = CarryOn(cfg.carryon, cfg.head, [[base.hidden_size]], base.vocab_size, cfg.layers.fusion, base.head_weight)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    m.set_alpha(1.0)
    return Adapter(m, [[Bridge(0)]], [], {}).attach(base)


def mlp(base, seed=4):
    m = random_carryon(base, "mlp")
    torch.manual_seed(seed)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    m.set_alpha(1.0)
    return Adapter(m, [[Bridge(0), Bridge(0)]], [0], {}).attach(base)


def raising(base):
    """An adapter whose carry-on forward raises (a corrupt or incompatible adapter)."""
    a = mlp(base, seed=9)

    def boom(*args, **kwargs):
        raise RuntimeError("this adapter is broken")

    a.carryon.forward = boom
    return a


def alone(base, req: Request, forward="flat") -> list[int]:
    """The row's tokens decoded alone, in an engine of its own with the same forward."""
    r = Request(**{**req.__dict__, "deadline": None})
    return Engine(base, max_rows=1, prefill_tokens=4096, forward=forward).run([r])[0].tokens


def test_lone_recycled_rows_of_different_ranks_share_a_step(deep_dir, deep_base):  # noqa: F811
    """The reported failure: recycled adapters of ranks 4, 8 and 16, one row each, beside a base row
    and an MLP row (before: every row of the step failed on torch.stack over different ranks)."""
    adapters = [rec(deep_dir, deep_base, 2, r, seed=r) for r in (4, 8, 16)] + [None, mlp(deep_base)]
    tok = deep_base.tokenizer
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ["a b c", "hello there", "x", "one two", "q"]]
    engine = Engine(deep_base, max_rows=8)
    got = [s.tokens for s in engine.run([Request(p, a, 8, stop_at_eos=False) for p, a in zip(prompts, adapters)])]
    assert engine.stats.isolated == 0  # no step failed (a failure would be isolated, and slower)
    for p, a, g in zip(prompts, adapters, got):
        assert g == alone(deep_base, Request(p, a, 8, stop_at_eos=False))
    assert len({tuple(g) for g in got[:3]}) == 3  # three adapters, three different continuations
    assert generate_mixed(deep_base, prompts, adapters, max_new_tokens=8, stop_at_eos=False) == got


def test_a_rows_delta_does_not_depend_on_its_batch_mates(deep_dir, deep_base):  # noqa: F811
    """One matmul pair per site for all adapted rows: a row's delta is its own alpha B A x whether it
    is alone, beside rows of its own adapter (at another alpha) or of adapters of other ranks; alpha
    is applied in fp32 (before, a lone bf16 row's alpha was rounded, 0.6 -> 0.6015625)."""
    from carryon_ray.recycled import DeltaLinear, bind_rows, unbind

    torch.manual_seed(0)
    ads = [recycled(deep_dir, deep_base, depth=2, rank=r, seed=r, noise=0.2)[1] for r in (4, 8, 16)]
    name, first = next(iter(ads[0].pairs()))
    site = DeltaLinear(torch.nn.Linear(first.A.shape[1], first.B.shape[0]).bfloat16())
    for m in ads:
        for p in m.deltas.parameters():
            p.data = p.data.bfloat16()
    x = torch.randn(5, first.A.shape[1]).bfloat16()

    sites = {n: DeltaLinear(torch.nn.Linear(1, 1)) for m in ads for n, _ in m.pairs()} | {name: site}

    def run(groups):
        bind_rows(sites, groups)
        try:
            return site(x)
        finally:
            unbind(sites)

    alone = run([(ads[0], [1], [0.6])])
    mixed = run([(ads[1], [0, 3], [1.0, 2.0]), (ads[0], [1, 2], [0.6, 0.3]), (ads[2], [4], [1.5])])
    lr = dict(ads[0].pairs())[name]
    exact = site.linear(x[1:2]).float() + 0.6 * (x[1:2].float() @ lr.A.float().T @ lr.B.float().T)
    assert float((alone[1] - exact[0]).abs().max()) <= 0.02 * float(exact.abs().max())
    assert float((mixed[1] - alone[1]).abs().max()) <= 1e-2 * float(exact.abs().max())
    assert torch.equal(alone[[0, 2, 3, 4]], site.linear(x)[[0, 2, 3, 4]])  # rows without a delta: the Linear
    assert not torch.equal(mixed[4], site.linear(x)[4])


@pytest.mark.parametrize("ending", ["cancel", "stop", "timeout", "length"])
def test_an_adapter_cache_slot_comes_back_however_its_row_ends(deep_base, ending):  # noqa: F811
    """A transformer carry-on's own KV slot is freed when its row ends while the engine stays busy
    (before: cancelled, stopped and timed-out rows kept theirs), and the adapter's pool goes with its
    last row (keyed by the adapter object, never by id())."""
    tr = transformer(deep_base)
    ids = deep_base.tokenizer("a b c d")["input_ids"]
    engine = Engine(deep_base, max_rows=4)
    busy = engine.submit(Request(ids, None, 200, stop_at_eos=False))
    for _ in range(6):
        row = engine.submit(Request(ids, tr, 3 if ending == "length" else 50, stop_at_eos=False))
        engine.step()
        engine.step()
        assert engine.runner.adapter_pools.live() == 1
        if ending == "cancel":
            row.cancel()
        elif ending == "stop":
            row.stop()
        elif ending == "timeout":
            row.request.deadline = 0.0
        while not row.done:
            engine.step()
        assert engine.runner.adapter_pools.live() == 0 and len(engine.runner.adapter_pools) == 0
        assert row.finish_reason == {"cancel": "cancelled", "stop": "stop", "timeout": "timeout", "length": "length"}[ending]
    assert not busy.done
    # a new adapter of another shape, loaded after the first is gone, gets a fresh cache and its own tokens
    del tr, row
    gc.collect()
    other = transformer(deep_base, width=16, seed=2)
    req = Request(ids, other, 6, stop_at_eos=False)
    seq = engine.submit(req)
    while not seq.done:
        engine.step()
    assert seq.tokens == alone(deep_base, req)


def test_a_raising_adapter_fails_only_its_own_rows(deep_dir, deep_base):  # noqa: F811
    """One adapter's carry-on raises and another's deltas do not fit the base: their rows end with the
    reason, every other row (base, MLP, recycled, transformer) gets exactly its alone tokens."""
    broken_rec = rec(deep_dir, deep_base, 2, 4, seed=7)
    lr = next(iter(broken_rec.carryon.deltas[0].values()))
    lr.A.data = torch.randn(4, lr.A.shape[1] + 1)  # a delta of the wrong shape: raises inside the base forward
    good = [None, mlp(deep_base), rec(deep_dir, deep_base, 2, 8, seed=1), transformer(deep_base)]
    tok = deep_base.tokenizer
    prompts = [tok(t)["input_ids"] for t in ["one two three", "hi", "the end of a long sentence here", "x y"]]
    engine = Engine(deep_base, max_rows=8, prefill_tokens=8)
    reqs = [Request(prompts[i % 4], a, 5 + i, stop_at_eos=False) for i, a in enumerate(good)]
    bad = [Request(prompts[0], raising(deep_base), 6, stop_at_eos=False), Request(prompts[1], broken_rec, 6, stop_at_eos=False)]
    seqs = [engine.submit(r) for r in reqs[:2] + bad[:1] + reqs[2:] + bad[1:]]
    ended = []
    while engine.has_work():
        ended += engine.step().finished
    assert sorted(s.id for s in ended) == sorted(s.id for s in seqs)  # each handed out once
    by_req = {id(s.request): s for s in seqs}
    for r in bad:
        s = by_req[id(r)]
        assert s.finish_reason == "error" and "the model failed for this request's adapter" in s.error
    assert "this adapter is broken" in by_req[id(bad[0])].error
    for r in reqs:
        s = by_req[id(r)]
        assert s.finish_reason == "length" and s.tokens == alone(deep_base, r)
    assert engine.stats.isolated >= 1 and engine.kv_bytes() == 0 and len(engine.runner.adapter_pools) == 0


def test_rows_that_ended_survive_a_step_that_raises(deep_base):  # noqa: F811
    """A row retired at the start of a step (cancelled) is still handed out when the step then raises
    outside the model (before: it lived in a local of the failed step and its client hung)."""
    ids = deep_base.tokenizer("a b c")["input_ids"]
    engine = Engine(deep_base, max_rows=4)
    a, b, c = (engine.submit(Request(ids, None, 50, stop_at_eos=False)) for _ in range(3))
    engine.step()
    a.cancel()
    sampler = engine.sampler

    def broken(seqs, logits):
        raise RuntimeError("sampler crashed")

    engine.sampler = broken
    with pytest.raises(RuntimeError, match="sampler crashed"):
        engine.step()
    engine.sampler = sampler
    ended = engine.abort_all("the decode step failed")
    assert {s.id for s in ended} == {a.id, b.id, c.id}
    assert a.finish_reason == "cancelled" and b.finish_reason == c.finish_reason == "error"
    assert not engine.has_work() and engine.kv_bytes() == 0


def test_loading_an_adapter_never_changes_the_base_under_a_running_engine(deep_dir, deep_base):  # noqa: F811
    """The engine wraps every block's linear layers once when it starts; attaching adapters of other
    depths and targets on another thread while it steps leaves the base's sites as they were (before:
    each attach added sites to the dict the engine's step iterates)."""
    engine = Engine(deep_base, max_rows=4)
    sites = deep_base.delta_sites
    before = dict(sites)
    assert len(before) == 4 * 7  # every block of the 4, every target
    ids = deep_base.tokenizer("a b c")["input_ids"]
    first = rec(deep_dir, deep_base, 2, 4, seed=1)
    req = Request(ids, first, 30, stop_at_eos=False)
    seq = engine.submit(req)
    errors = []

    def load_many():
        try:
            for i in range(6):
                _, m = recycled(deep_dir, deep_base, depth=1 + i % 4, rank=4, seed=i, targets=["q_proj", "down_proj"][: 1 + i % 2])
                Adapter(m, [[Bridge(0)]], [], {}).attach(deep_base)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=load_many)
    t.start()
    while not seq.done:
        engine.step()
    t.join()
    assert not errors and deep_base.delta_sites is sites and sites == before
    assert seq.tokens == alone(deep_base, req)


def test_training_at_alpha_zero_has_a_zero_gradient(deep_dir, deep_base):  # noqa: F811
    """alpha.init 0, a guard that picks 0 or a list rule with 0: the recycled kind's train step runs (it
    raised in loss.backward: the skipped deltas left no graph), its loss is the base's, nothing moves."""
    from carryon_ray.train import train_step

    _, m = recycled(deep_dir, deep_base, depth=2, noise=0.1)
    m.set_alpha(0.0)
    ids = deep_base.tokenizer("Question: one plus one?\nAnswer: two", return_tensors="pt")["input_ids"]
    (h,), _ = deep_base.hidden_states(ids, torch.ones_like(ids), tap=deep_base.num_layers - 2)
    opt = torch.optim.SGD(m.trainable_parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    res = train_step(m, opt, None, [[h]], ids)
    want = torch.nn.functional.cross_entropy(deep_base.logits(ids)[0, :-1], ids[0, 1:])
    assert res.loss == pytest.approx(float(want), rel=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())


@pytest.mark.parametrize("forward", ["flat", "padded"])
def test_random_mixed_tenants_over_many_steps(deep_dir, deep_base, forward):  # noqa: F811
    """The randomized check: rows of every kind (base, MLP, transformer with its cache, recycled of
    ranks 4/8/16 and depths 2/3, one raising adapter) with per-row alpha overrides, greedy and seeded
    sampling, joining at random steps, some cancelled, stopped or timed out, through one engine.
    Completed rows equal their alone decode; cut rows are a prefix of it; the raising adapter's rows
    fail with its reason; each ended row is handed out once; all KV memory is free at the end."""
    rng = random.Random(11 if forward == "flat" else 12)
    base = deep_base
    kinds = [None, mlp(base), transformer(base), raising(base)]
    kinds += [rec(deep_dir, base, d, r, seed=10 * d + r) for d, r in ((2, 4), (3, 8), (2, 16), (3, 4))]
    broken = kinds[3]
    engine = Engine(base, max_rows=6, prefill_tokens=12, forward=forward)
    pending, seqs, ended, cut = [], [], [], {}
    for i in range(40):
        a = rng.choice(kinds)
        prompt = [rng.randrange(100, base.vocab_size) for _ in range(rng.randint(1, 18))]
        # sampled rows at a low temperature: this random model's logits are nearly flat, and at T = 1 an
        # inverse-CDF draw over ~1k near-equal probabilities moves with float noise of the batch's shape
        temp, seed = (0.0, None) if rng.random() < 0.6 else (0.02, rng.randrange(1000))
        alpha = None if a is None or rng.random() < 0.6 else rng.choice([0.0, 0.5, 2.0])
        pending.append((rng.randrange(40), Request(prompt, a, rng.randint(1, 10), temp, 1.0, seed, alpha,
                                                   stop_at_eos=False)))
    step = 0
    while step < 400 and (pending or engine.has_work()):
        for at, req in [p for p in pending if p[0] <= step]:
            pending.remove((at, req))
            seqs.append(engine.submit(req))
        for s in seqs:
            if s.done or s.id in cut or not s.tokens or rng.random() > 0.06:
                continue
            how = rng.choice(["cancel", "stop", "timeout"])
            cut[s.id] = how
            if how == "cancel":
                s.cancel()
            elif how == "stop":
                s.stop()
            else:
                s.request.deadline = time.monotonic() - 1
        ended += engine.step().finished
        step += 1
    assert not pending and not engine.has_work()
    assert sorted(s.id for s in ended) == sorted(s.id for s in seqs)
    assert len(set(cut.values())) == 3 and engine.stats.isolated > 0  # the run exercised every ending
    for s in seqs:
        r = s.request
        if r.adapter is broken:
            assert s.finish_reason in ("error", "cancelled", "timeout") and (
                s.finish_reason != "error" or "this adapter is broken" in s.error)
            continue
        want = alone(base, r, forward)
        if s.id in cut and s.finish_reason != "length":
            assert s.finish_reason in ("cancelled", "stop", "timeout") and s.tokens == want[: len(s.tokens)]
        else:
            assert s.finish_reason == "length" and s.tokens == want, (r.adapter, r.alpha, r.seed)
    assert engine.kv_bytes() == 0 and len(engine.runner.adapter_pools) == 0 and not engine.rows
