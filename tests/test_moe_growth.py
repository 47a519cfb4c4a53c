"""The rest of the paper in the model and the in-process trainer: the MoE carry-on (routing, load
balance, router dropout), multi-head latent attention (cached decoding equals the full forward),
growing in depth (earlier stages bit-identical, one alpha per stage) and packed continued
pretraining. The Ray job runs of the same features are in test_job.py."""

import json
from pathlib import Path

import pytest
import torch

from carryon_ray.config import ConfigError
from carryon_ray.engine.kv import KVPool, step_mask
from carryon_ray.generation import CarryOnModel
from carryon_ray.model import MoE, CarryOn
from carryon_ray.pipeline import fit_in_process
from carryon_ray.train import build_carryon, grow_stage, make_optimizer, router_dropout_at, stage_digest, train_step
from conftest import make_config

MOE_MLA = {"kind": "transformer", "width": 32, "heads": 4, "layers": 2, "attention": "mla", "kv_rank": 8,
           "q_rank": 16, "rope_dim": 4, "experts": 4, "top_k": 2, "shared_experts": 1}


def _moe(top_k=2, experts=4):
    cfg = make_config(carryon={**MOE_MLA, "top_k": top_k, "experts": experts}).carryon
    torch.manual_seed(0)
    return MoE(cfg)


def test_moe_routes_each_token_to_top_k_experts_and_balance_loss_matches_its_formula():
    moe = _moe(top_k=2, experts=4).eval()
    h = torch.randn(3, 5, 32)
    out = moe(h)
    assert out.shape == h.shape
    assert float(moe.usage.sum()) == 3 * 5 * 2  # every token used exactly top_k routed slots
    # Recompute E * sum_i f_i P_i by hand from the router.
    with torch.no_grad():
        probs = torch.softmax(moe.router(h.reshape(-1, 32)), -1)
    chosen = probs.topk(2, -1).indices
    f = torch.bincount(chosen.reshape(-1), minlength=4).float() / chosen.numel()
    assert float(moe.balance_loss.detach()) == pytest.approx(float(4 * (f * probs.mean(0)).sum()), rel=1e-5)
    # The output is the renormalised mix of the chosen experts plus the shared one, token by token.
    tok = h.reshape(-1, 32)[7]
    w, idx = probs[7].topk(2)
    w = w / w.sum()
    want = sum(w[j] * moe.experts[int(idx[j])](tok) for j in range(2)) + moe.shared[0](tok)
    assert torch.allclose(out.reshape(-1, 32)[7], want, atol=1e-6)


def test_load_balance_loss_grows_when_routing_collapses():
    moe = _moe(top_k=1, experts=4).eval()
    h = torch.randn(2, 64, 32)
    with torch.no_grad():
        moe(h)
        spread = float(moe.balance_loss)
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 50.0  # every token with h[..., 0] > 0 goes to expert 0
        moe(h.abs())
        collapsed = float(moe.balance_loss)
    assert spread < 1.5  # a random router spreads tokens: near the balanced value 1
    assert collapsed > 3.5  # near E = 4: all slots and all probability on one expert


def test_router_dropout_decays_and_only_acts_in_training():
    m = build_carryon(make_config(carryon=MOE_MLA, head={"kind": "new", "bottleneck": 8}), [48], 100)
    assert router_dropout_at(m, 0, 11) == pytest.approx(0.5)
    assert router_dropout_at(m, 5, 11) == pytest.approx(0.3)
    assert router_dropout_at(m, 10, 11) == pytest.approx(0.1)
    assert all(layer.router_dropout == pytest.approx(0.1) for layer in m.moe_layers())
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 6, 48)
    m.eval()
    ref = m([[x]])
    m.set_router_dropout(0.9)
    again = m([[x]])
    assert torch.equal(ref, again)  # evaluation and serving never drop experts
    m.train()
    torch.manual_seed(3)
    dropped = m([[x]])
    assert not torch.equal(ref, dropped)
    # The hidden experts come from the step's seed, not the process's global stream: a fit sharing its
    # process with others (the trainer service's threads), or resumed from a checkpoint, draws the
    # masks it would draw alone and uninterrupted.
    router_dropout_at(m, 5, 11, seed=hash((0, 5, 0)))
    torch.manual_seed(1)
    first = m([[x]])
    torch.manual_seed(2)
    torch.rand(1000)  # another fit's draws in between
    assert torch.equal(m([[x]]), first)
    router_dropout_at(m, 5, 11, seed=hash((0, 6, 0)))  # the same rate at the next step: new masks
    assert not torch.equal(m([[x]]), first)


@pytest.mark.parametrize("attention", ["mla", "gqa"])
def test_cached_decoding_equals_the_full_forward(attention):
    arch = {**MOE_MLA, "attention": attention, "kv_heads": 2}
    m = build_carryon(make_config(carryon=arch, head={"kind": "new", "bottleneck": 8}), [48], 100)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)
    m.eval()
    x = torch.randn(2, 9, 48)
    full = m([[x]])
    pool = KVPool(64)

    def fed(start: int, T: int):
        starts = torch.tensor([start, start])
        pool.bind([0, 1], starts, T)
        return dict(cache=pool, positions=starts[:, None] + torch.arange(T), attn_mask=step_mask(starts, T, start + T, "cpu"))

    steps = [m([[x[:, :5]]], **fed(0, 5))]
    for t in range(5, 9):
        steps.append(m([[x[:, t : t + 1]]], **fed(t, 1)))
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    if attention == "mla":  # the cache is the latent plus one shared RoPE key per token
        assert pool.k[0].shape[1:] == (1, pool.length, 8) and pool.v[0].shape[1:] == (1, pool.length, 4)


def test_moe_mla_carryon_keeps_the_alpha_zero_invariant(tiny_base):
    cfg = make_config(carryon=MOE_MLA, layers={"shallow": [0]})
    m = build_carryon(cfg, [tiny_base.hidden_size], tiny_base.vocab_size, tiny_base.head_weight, tiny_base.head_bias)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    enc = tiny_base.tokenizer(["Question: 2 + 3?\nAnswer:", "Hello"], return_tensors="pt", padding=True,
                              padding_side="left")
    from carryon_ray.bridge import Bridge

    model = CarryOnModel([tiny_base], m, Bridge(8), shallow=[0])
    ref = tiny_base.logits(enc["input_ids"], enc["attention_mask"])
    assert torch.equal(model.logits(enc["input_ids"], enc["attention_mask"], alpha=0.0), ref)
    assert not torch.equal(model.logits(enc["input_ids"], enc["attention_mask"], alpha=1.0), ref)


def test_train_step_adds_the_weighted_balance_loss():
    cfg = make_config(carryon={**MOE_MLA, "balance_weight": 0.5}, head={"kind": "new", "bottleneck": 8})
    m = build_carryon(cfg, [48], 100)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    m.set_router_dropout(0.0)
    opt = torch.optim.SGD(m.trainable_parameters(), lr=0.0)
    out = train_step(m, opt, None, [[torch.randn(2, 6, 48)]], torch.randint(0, 100, (2, 6)), 64, 1.0)
    assert out.balance >= 1.0 - 1e-6  # E * sum f P >= 1 (equality only when balanced)
    assert out.loss == pytest.approx(out.ce + 0.5 * out.balance, rel=1e-5)


def test_right_padding_stays_out_of_the_balance_loss_and_expert_usage():
    cfg = make_config(carryon={**MOE_MLA, "balance_weight": 0.5}, head={"kind": "new", "bottleneck": 8})
    m = build_carryon(cfg, [48], 100)
    m.set_router_dropout(0.0)
    opt = torch.optim.SGD(m.trainable_parameters(), lr=0.0)  # lr 0: the two steps see the same weights
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    labels = torch.randint(0, 100, (2, 6)).masked_fill(mask == 0, -100)
    x = torch.randn(2, 6, 48)
    junk = x.clone()
    junk[1, 3:] = 50 * torch.randn(3, 48)  # different padding, same real tokens

    def step(states, key_mask):
        for layer in m.moe_layers():
            layer.reset_usage()
        out = train_step(m, opt, None, [[states]], labels, 64, 1.0, key_mask=key_mask)
        return out.balance, sum(layer.usage.sum() for layer in m.moe_layers())

    (b1, u1), (b2, u2) = step(x, mask), step(junk, mask)
    assert b1 == pytest.approx(b2, rel=1e-6) and u1 == u2 == 2 * 9 * 2  # 2 layers x 9 real tokens x top_k 2
    (b3, u3), (b4, _) = step(x, None), step(junk, None)
    assert u3 == 2 * 12 * 2 and b3 != pytest.approx(b4, rel=1e-6)  # unmasked, the pads would count


def test_growing_trains_only_the_newest_stage_and_keeps_earlier_ones_bit_identical():
    cfg = make_config(carryon={"kind": "mlp", "width": 16, "stages": 3}, head={"kind": "new", "bottleneck": 8})
    m = build_carryon(cfg, [24], 50, stages=1)
    assert len(m.stages) == 1
    data = [([[torch.randn(4, 7, 24)]], torch.randint(0, 50, (4, 7))) for _ in range(3)]
    digests = []
    for stage in range(3):
        if stage:
            grow_stage(m, cfg)
        opt, sched = make_optimizer(m, cfg, 3)
        assert {id(p) for p in m.trainable_parameters()} >= {id(p) for p in m.stages[-1].parameters()}
        assert not any(p.requires_grad for s in m.stages[:-1] for p in s.parameters())
        before = stage_digest(m, stage)
        for sources, labels in data:
            train_step(m, opt, sched, sources, labels, 64, 1.0)
        assert stage_digest(m, stage) != before  # the newest stage learned
        assert [stage_digest(m, i) for i in range(stage)] == digests  # earlier stages did not move
        m.set_alpha(0.1 * (stage + 1))
        digests.append(stage_digest(m, stage))
    assert m.alphas.tolist() == pytest.approx([0.1, 0.2, 0.3])  # one alpha per stage


def test_in_process_growing_run_chooses_an_alpha_per_stage_and_saves_every_stage(tmp_path, tiny_dir):
    cfg = make_config(base={"name": tiny_dir}, carryon={"kind": "mlp", "width": 16, "stages": 2},
                      data={"builtin_size": 48, "max_length": 96}, train={"epochs": 1, "batch_size": 8},
                      output={"dir": str(tmp_path)})
    r = fit_in_process(cfg)
    assert [h["stage"] for h in r["history"]] == [0, 1]
    saved = json.loads((Path(r["adapter"]) / "adapter_config.json").read_text())
    assert saved["carryon"]["stages"] == 2 and len(saved["alphas"]) == 2
    assert saved["alphas"] == pytest.approx([h["alpha"] for h in r["history"]])
    model = CarryOnModel.from_pretrained(tiny_dir, r["adapter"])
    assert len(model.carryon.stages) == 2
    assert r["val_loss_after"] <= r["history"][0]["val_loss"] + 1e-6  # a stage never makes validation worse


def test_packed_text_fills_every_window_and_keeps_every_token(tiny_base, tmp_path):
    from carryon_ray.config import DataConfig
    from carryon_ray.data import load_examples

    docs = [" ".join(f"word{i}x{j}" for j in range(n)) for i, n in enumerate([3, 40, 7, 90, 1, 12])]
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(docs) + "\n")
    cfg = DataConfig(train=str(path), format="text", pack=True, max_length=32)
    examples, report = load_examples(str(path), tiny_base.tokenizer, cfg)
    tok = tiny_base.tokenizer
    stream = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert [t for e in examples for t in e.input_ids] == stream  # nothing dropped, nothing duplicated
    assert all(len(e.input_ids) == 32 for e in examples[:-1])  # full windows, no padding
    assert all(e.labels == e.input_ids for e in examples)  # loss on every token
    assert report.kept == len(docs)
    with pytest.raises(ConfigError, match="data.pack packs plain text; set data.format: text"):
        make_config(data={"train": "x.txt", "pack": True})


def test_moe_and_attention_options_need_the_transformer_kind():
    with pytest.raises(ConfigError, match="carryon.kind: transformer"):
        make_config(carryon={"kind": "mlp", "experts": 4})
    with pytest.raises(ConfigError, match="top_k .* exceeds carryon.experts"):
        make_config(carryon={**MOE_MLA, "top_k": 5})
    with pytest.raises(ConfigError, match="rope_dim"):
        make_config(carryon={**MOE_MLA, "rope_dim": 3})
    assert isinstance(build_carryon(make_config(carryon=MOE_MLA), [32], 10, torch.zeros(10, 32)), CarryOn)


def test_mixed_base_adapter_serves_next_to_single_base_ones(tmp_path, tiny_dir, tiny_base, smol_dir):
    """Two different bases (widths 64 and 48, 2 and 3 blocks) fused by projection; in one
    mixed-adapter batch every row decodes exactly as its adapter does alone."""
    from carryon_ray.base import FrozenBase
    from carryon_ray.config import BaseModelConfig
    from carryon_ray.generation import Adapter, generate_mixed
    from conftest import make_tiny_base

    other_dir = make_tiny_base(tmp_path / "other", smol_dir, seed=1, hidden=48, layers=3)
    other = FrozenBase.load(BaseModelConfig(name=other_dir, dtype="float32"))
    common = dict(data={"builtin_size": 48, "max_length": 96}, train={"epochs": 1, "batch_size": 8, "lr": 1e-2},
                  carryon={"kind": "transformer", "width": 32, "heads": 4, "kv_heads": 2, "layers": 1},
                  layers={"shallow": [0], "fusion": "projection"}, alpha={"init": 1.0})
    mixed = fit_in_process(make_config(base={"name": tiny_dir}, extra_bases=[{"name": other_dir}],
                                       output={"dir": str(tmp_path / "mixed")}, **common))
    single = fit_in_process(make_config(base={"name": tiny_dir}, output={"dir": str(tmp_path / "single")}, **common))
    saved = json.loads((Path(mixed["adapter"]) / "adapter_config.json").read_text())
    assert len(saved["fingerprints"]) == 2 and saved["dims"] == [[64, 64], [48, 48]]
    bases = [tiny_base, other]
    a_mixed, a_single = Adapter.load(bases, mixed["adapter"]), Adapter.load(bases, single["adapter"])
    with pytest.raises(Exception, match="mixes 2 bases; this server holds 1"):
        Adapter.load([tiny_base], mixed["adapter"])
    with pytest.raises(Exception, match="not the base this adapter was trained on"):
        Adapter.load([other, tiny_base], single["adapter"])
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    got = generate_mixed(bases, prompts, [a_mixed, a_single, None], max_new_tokens=6, stop_at_eos=False)
    alone_mixed = CarryOnModel.from_pretrained(bases, mixed["adapter"])
    alone_single = CarryOnModel.from_pretrained([tiny_base], single["adapter"])
    assert got[0] == alone_mixed.generate([prompts[0]], 6, stop_at_eos=False)[0]
    assert got[1] == alone_single.generate([prompts[1]], 6, stop_at_eos=False)[0]
    assert got[2] == CarryOnModel([tiny_base]).generate([prompts[2]], 6, stop_at_eos=False)[0]
    # alpha = 0 on the mixed adapter is the bare base 0, token for token.
    bare = CarryOnModel([tiny_base]).generate([prompts[0]], 6, stop_at_eos=False)[0]
    assert generate_mixed(bases, prompts[:1], [a_mixed], max_new_tokens=6, alphas=[0.0], stop_at_eos=False)[0] == bare


def test_growing_lora_phase_readjusts_earlier_stages_through_deltas_only(tmp_path):
    from carryon_ray.adapter import load_adapter, save_adapter
    from carryon_ray.bridge import Bridge

    cfg = make_config(carryon={"kind": "mlp", "width": 16, "stages": 2, "stage_lora_rank": 2},
                      head={"kind": "new", "bottleneck": 8})
    m = build_carryon(cfg, [24], 50, stages=1)
    data = [([[torch.randn(4, 7, 24)]], torch.randint(0, 50, (4, 7))) for _ in range(3)]
    opt, sched = make_optimizer(m, cfg, 3)
    for sources, labels in data:
        train_step(m, opt, sched, sources, labels, 64, 1.0)
    stage0 = {k: v.clone() for k, v in m.stages[0].state_dict().items()}
    grow_stage(m, cfg)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("stages.0.")} == {
        f"stages.0.{n}.{ab}" for n in ("trunk.inp", "f", "g") for ab in ("A", "B")}  # only the deltas
    opt, sched = make_optimizer(m, cfg, 3)
    for sources, labels in data:
        train_step(m, opt, sched, sources, labels, 64, 1.0)
    now = m.stages[0].state_dict()
    assert all(torch.equal(now[k], v) for k, v in stage0.items())  # the earlier weights did not move ...
    assert any(float(now[k].abs().sum()) > 0 for k in now if k.endswith(".B"))  # ... their deltas did
    m.eval()
    with torch.no_grad():
        before = m(data[0][0])
    out = save_adapter(tmp_path / "a", m, [[Bridge(0)]], [], [], "tok")
    loaded, _, _ = load_adapter(out)
    with torch.no_grad():
        after = loaded(data[0][0])
    assert torch.allclose(before, after, atol=1e-5)  # folded: plain weights, same function


def test_moe_mla_grown_adapter_decodes_in_a_mixed_batch_as_alone(tmp_path, tiny_base, tiny_dir):
    """What the Serve replicas run (generate_mixed) for an adapter with every issue-6 option."""
    from carryon_ray.adapter import save_adapter
    from carryon_ray.bridge import Bridge
    from carryon_ray.generation import Adapter, generate_mixed

    cfg = make_config(base={"name": tiny_dir}, carryon={**MOE_MLA, "stages": 2}, layers={"shallow": [0]},
                      alpha={"init": 1.0})
    m = build_carryon(cfg, [64], tiny_base.vocab_size, tiny_base.head_weight, stages=1)
    grow_stage(m, cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    path = save_adapter(tmp_path / "a", m, [[Bridge(8), Bridge(8)]], [0], [tiny_base.fingerprint().to_dict()], tiny_dir)
    adapter = Adapter.load(tiny_base, path)
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    got = generate_mixed(tiny_base, prompts, [adapter, None], max_new_tokens=5, stop_at_eos=False)
    alone = CarryOnModel.from_pretrained(tiny_base, path).generate([prompts[0]], 5, stop_at_eos=False)[0]
    assert got[0] == alone
    assert got[1] == CarryOnModel([tiny_base]).generate([prompts[1]], 5, stop_at_eos=False)[0]
