"""Carry-on model: parameter budget, where gradients go, stacked stages."""

import torch

from carryon_ray.config import ArchConfig, HeadConfig
from carryon_ray.model import CarryOn
from carryon_ray.train import build_carryon, make_optimizer, train_step
from conftest import make_config


def test_tiny_carryon_fits_in_one_megabyte():
    """The paper's tiny carry-on on a 7B-class base (D = 3584, r = 64, gate off) is under 1 MB in bf16."""
    D, r, V = 3584, 64, 1000
    m = CarryOn(ArchConfig(kind="mlp", width=r, gate=False), HeadConfig(), [[D]], V, head_weight=torch.zeros(V, D))
    n = m.num_params()
    assert n == D * r + r + r * D + D  # two linear layers with biases; the inherited head is not counted
    size = n * 2
    print(f"tiny carry-on, gate off: {n} params, {size / 1e6:.3f} MB in bf16")
    assert size < 1_000_000
    gated = CarryOn(ArchConfig(kind="mlp", width=r, gate=True), HeadConfig(), [[D]], V, head_weight=torch.zeros(V, D))
    print(f"tiny carry-on, gate on: {gated.num_params()} params, {gated.num_params() * 2 / 1e6:.3f} MB in bf16")
    assert gated.num_params() == n + r * D + D
    # The adapter never stores the inherited head.
    assert not any("head" in k for k in m.state_dict() if k != "alphas")


def _batch(base, n=4, T=24):
    torch.manual_seed(0)
    ids = torch.randint(0, base.vocab_size, (n, T))
    labels = ids.clone()
    labels[:, : T // 2] = -100
    states, _ = base.hidden_states(ids, torch.ones_like(ids), [0])
    return [states], labels


def test_gradients_only_reach_the_carryon(tiny_base):
    cfg = make_config(layers={"shallow": [0]}, carryon={"kind": "transformer", "width": 32})
    m = build_carryon(cfg, [tiny_base.hidden_size], tiny_base.vocab_size, tiny_base.head_weight)
    base_before = {k: v.clone() for k, v in tiny_base.model.state_dict().items()}
    co_before = {k: v.clone() for k, v in m.state_dict().items()}
    opt, sched = make_optimizer(m, cfg, 10)
    sources, labels = _batch(tiny_base)
    for _ in range(2):
        train_step(m, opt, sched, sources, labels)
    assert all(not p.requires_grad for p in tiny_base.model.parameters())
    assert m.head.weight.data_ptr() == tiny_base.head_weight.data_ptr()  # shared, not copied
    for k, v in tiny_base.model.state_dict().items():
        assert torch.equal(v, base_before[k]), k
    changed = [k for k, v in m.state_dict().items() if not torch.equal(v, co_before[k])]
    assert changed and all(k.startswith("stages.0.") for k in changed)


def test_new_head_trains_and_has_bottleneck(tiny_base):
    cfg = make_config(head={"kind": "new", "bottleneck": 16})
    m = build_carryon(cfg, [tiny_base.hidden_size], tiny_base.vocab_size)
    assert m.head.down.weight.shape == (16, tiny_base.hidden_size)
    opt, sched = make_optimizer(m, cfg, 10)
    w = m.head.out.weight.clone()
    sources, labels = _batch(tiny_base)
    train_step(m, opt, sched, [[sources[0][0]]], labels)
    assert not torch.equal(w, m.head.out.weight)


def test_stacked_stages_keep_earlier_ones_frozen(tiny_base):
    cfg = make_config(carryon={"kind": "mlp", "width": 16})
    m = build_carryon(cfg, [tiny_base.hidden_size], tiny_base.vocab_size, tiny_base.head_weight)
    opt, sched = make_optimizer(m, cfg, 10)
    sources, labels = _batch(tiny_base)
    sources = [[sources[0][0]]]
    for _ in range(3):
        train_step(m, opt, sched, sources, labels)
    m.set_alpha(0.7)
    m.grow(alpha=0.2)
    assert m.alphas.tolist() == [0.699999988079071, 0.20000000298023224] or torch.allclose(
        m.alphas, torch.tensor([0.7, 0.2]))
    stage0 = {k: v.clone() for k, v in m.stages[0].state_dict().items()}
    opt, sched = make_optimizer(m, cfg, 10)
    before = m.stages[1].f.weight.clone()
    for _ in range(3):
        train_step(m, opt, sched, sources, labels)
    for k, v in m.stages[0].state_dict().items():
        assert torch.equal(v, stage0[k]), k
    assert not torch.equal(before, m.stages[1].f.weight)
    # x_2 = x_1 + a_2 dx_2 with x_1 = x_0 + a_1 dx_1
    with torch.no_grad():
        x0 = sources[0][0]
        dx1 = m.stages[0]([[x0]])
        x1 = x0 + m.alphas[0] * dx1
        dx2 = m.stages[1]([[x1]])
        out = m(sources)
    assert torch.allclose(out, x1 + m.alphas[1] * dx2)


def test_carryons_built_at_once_in_threads_get_the_weights_their_seeds_give_alone():
    """Fits that share a process (the trainer service: a thread per fit) seed torch's one default
    generator; each must start from the weights its seed gives alone, however the builds interleave.
    Eight threads build transformer carry-ons with different seeds, ten times each."""
    import threading

    D, V = 64, 256

    def build(seed: int) -> dict:
        cfg = make_config(carryon={"kind": "transformer", "width": 32}, train={"seed": seed})
        return build_carryon(cfg, [D], V, torch.zeros(V, D)).state_dict()

    alone = {seed: build(seed) for seed in range(8)}
    wrong = []

    def worker(seed: int):
        for _ in range(10):
            got = build(seed)
            if not all(torch.equal(v, alone[seed][k]) for k, v in got.items()):
                wrong.append(seed)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, f"builds that drew from another's stream: seeds {sorted(set(wrong))}"
