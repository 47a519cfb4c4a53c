"""KV-cached generation produces exactly the tokens of full-sequence recomputation."""

import pytest
import torch

from carryon_ray.bridge import Bridge
from carryon_ray.generation import CarryOnModel
from test_invariants import random_carryon

PROMPTS = ["Question: A farmer has 12 cows and buys 5 more. How many cows?\nAnswer:", "Once upon a time"]


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_kv_cache_matches_recompute(smol_fp32, kind):
    base = smol_fp32
    model = CarryOnModel([base], random_carryon(base, kind, shallow=(0,)), Bridge(8), shallow=[0])
    model.carryon.set_alpha(0.05)  # a small correction: outputs differ from the base but stay fluent
    prompts = [base.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    cached = model.generate(prompts, 16, use_cache=True, stop_at_eos=False)
    full = model.generate(prompts, 16, use_cache=False, stop_at_eos=False)
    assert cached == full
    assert all(len(o) == 16 for o in cached)
    assert len(set(cached[0])) > 3  # real text, not one repeated token
    ids = torch.tensor([prompts[0]])
    assert not torch.equal(model.logits(ids), base.logits(ids))  # the carry-on is active


def test_sampling_is_seeded(tiny_base):
    model = CarryOnModel([tiny_base], random_carryon(tiny_base, "mlp"), shallow=[0])
    p = [tiny_base.tokenizer("hello world")["input_ids"]]
    a = model.generate(p, 12, temperature=1.0, top_p=0.9, seed=3, stop_at_eos=False)
    b = model.generate(p, 12, temperature=1.0, top_p=0.9, seed=3, stop_at_eos=False)
    c = model.generate(p, 12, temperature=1.0, top_p=0.9, seed=4, stop_at_eos=False)
    assert a == b and a != c


def test_left_padded_batch_matches_single_rows(smol_fp32):
    base = smol_fp32
    model = CarryOnModel([base], random_carryon(base, "transformer"), Bridge(0), shallow=[0])
    model.carryon.set_alpha(0.05)
    prompts = [base.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    together = model.generate(prompts, 8, stop_at_eos=False)
    alone = [model.generate([p], 8, stop_at_eos=False)[0] for p in prompts]
    assert together == alone


def test_mixed_adapter_batch_matches_each_adapter_alone(smol_fp32):
    """One base forward per step for rows of different users: each row gets exactly the tokens
    its own adapter produces alone (greedy), and seeded sampling is per row."""
    from carryon_ray.generation import Adapter, generate_mixed

    base = smol_fp32
    a = random_carryon(base, "transformer", shallow=(0,))
    a.set_alpha(0.05)
    b = random_carryon(base, "mlp", shallow=(0,))
    torch.manual_seed(5)
    for p in b.parameters():
        torch.nn.init.normal_(p, std=0.05)
    b.set_alpha(3.0)  # strong enough to change greedy tokens
    ad_a, ad_b = Adapter(a, [[Bridge(8), Bridge(8)]], [0], {}), Adapter(b, [[Bridge(0), Bridge(0)]], [0], {})
    prompts = [base.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS + ["The weather today"]]
    rows = [(prompts[0], ad_a), (prompts[1], ad_b), (prompts[2], None), (prompts[1], ad_a)]
    mixed = generate_mixed(base, [p for p, _ in rows], [ad for _, ad in rows], max_new_tokens=10, stop_at_eos=False)
    for (prompt, ad), got in zip(rows, mixed):
        alone = CarryOnModel([base], ad.carryon if ad else None, ad.bridges if ad else None,
                             ad.shallow if ad else ()).generate([prompt], 10, stop_at_eos=False)[0]
        assert got == alone
    assert mixed[1] != mixed[3]  # same prompt, different users, different outputs
    assert mixed[1] != CarryOnModel([base]).generate([prompts[1]], 10, stop_at_eos=False)[0]
    sampled = generate_mixed(base, [prompts[0]] * 2, [ad_a, ad_a], 8, temperature=1.0, seeds=[1, 1], stop_at_eos=False)
    assert sampled[0] == sampled[1]
    alone = CarryOnModel([base], a, ad_a.bridges, [0]).generate([prompts[0]], 8, temperature=1.0, seed=1, stop_at_eos=False)
    assert sampled[0] == alone[0]
