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
