"""The paper's exact invariant: with the inherited head and alpha = 0, base + carry-on gives the
base model's logits bit for bit (torch.equal), on the real SmolLM2 and on a tiny random Llama."""

import pytest
import torch

from carryon_ray.bridge import Bridge
from carryon_ray.generation import CarryOnModel
from carryon_ray.model import CarryOn
from conftest import make_config

PROMPTS = ["Question: Tom has 3 apples and buys 4 more. How many apples?\nAnswer:", "The capital of France is"]


def random_carryon(base, kind: str, shallow=(0,), gate=True, fusion="average", head_rank=0) -> CarryOn:
    cfg = make_config(carryon={"kind": kind, "width": 32, "heads": 4, "kv_heads": 2, "gate": gate},
                      layers={"shallow": list(shallow), "fusion": fusion}, head={"rank": head_rank})
    torch.manual_seed(1)
    m = CarryOn(cfg.carryon, cfg.head, [[base.hidden_size] * (1 + len(shallow))], base.vocab_size,
                cfg.layers.fusion, base.head_weight, base.head_bias)
    for p in m.parameters():  # non-zero everywhere, so dx != 0 and the test means something
        torch.nn.init.normal_(p, std=0.05)
    return m


def batch(tok):
    enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("which", ["tiny_base", "smol_fp32", "smol_bf16"])
@pytest.mark.parametrize("kind", ["mlp", "transformer"])
@pytest.mark.parametrize("bits", [0, 8, 2])
def test_alpha_zero_reproduces_base_logits(request, which, kind, bits):
    base = request.getfixturevalue(which)
    ids, mask = batch(base.tokenizer)
    model = CarryOnModel([base], random_carryon(base, kind), Bridge(bits), shallow=[0])
    ref = base.logits(ids, mask)
    out = model.logits(ids, mask, alpha=0.0)
    assert out.dtype == ref.dtype
    assert torch.equal(out, ref)
    # ... and the carry-on really acts when alpha > 0.
    assert not torch.equal(model.logits(ids, mask, alpha=1.0), ref)


@pytest.mark.parametrize("which", ["tiny_base", "smol_bf16"])
def test_a_head_correction_keeps_alpha_zero_exact(request, which):
    """head.rank adds alpha * U V x to the base's logits: at alpha = 0 (a number, or a zero in a per-row
    alpha tensor) the logits are still the base's bit for bit; at alpha > 0 the correction acts."""
    base = request.getfixturevalue(which)
    ids, mask = batch(base.tokenizer)
    m = random_carryon(base, "mlp", head_rank=4)
    model = CarryOnModel([base], m, Bridge(8), shallow=[0])
    ref = base.logits(ids, mask)
    assert torch.equal(model.logits(ids, mask, alpha=0.0), ref)
    states, _ = base.hidden_states(ids, mask)
    x = states[0]
    with torch.no_grad():
        per_row = m.logits(x, torch.tensor([0.0, 1.0]))
    assert torch.equal(per_row[0], ref[0]) and not torch.equal(per_row[1], ref[1])
    corrected = model.logits(ids, mask, alpha=1.0)
    m.correction = None  # the same carry-on without its head correction
    assert not torch.equal(model.logits(ids, mask, alpha=1.0), corrected)


@pytest.mark.parametrize("fusion", ["average", "projection"])
def test_alpha_zero_with_projection_fusion_and_stages(tiny_base, fusion):
    base = tiny_base
    ids, mask = batch(base.tokenizer)
    m = random_carryon(base, "transformer", shallow=(0, 1), fusion=fusion)
    m.grow(alpha=0.3)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    m.alphas.zero_()
    model = CarryOnModel([base], m, Bridge(8), shallow=[0, 1])
    assert torch.equal(model.logits(ids, mask), base.logits(ids, mask))
    m.alphas.fill_(0.5)
    assert not torch.equal(model.logits(ids, mask), base.logits(ids, mask))


def test_untrained_carryon_is_a_noop(smol_bf16):
    """f starts at zero, so a fresh carry-on at any alpha is the base."""
    cfg = make_config()
    base = smol_bf16
    m = CarryOn(cfg.carryon, cfg.head, [[576]], base.vocab_size, "average", base.head_weight, None, alpha=2.0)
    ids, mask = batch(base.tokenizer)
    assert torch.equal(CarryOnModel([base], m).logits(ids, mask), base.logits(ids, mask))


@pytest.mark.parametrize("bits,bound", [(0, 0.0), (8, 0.01), (4, 0.8), (2, 3.0)])
def test_training_side_logits_through_the_bridge(smol_fp32, bits, bound):
    """On the training side only sigma^-1(sigma(x)) exists; at alpha = 0 its logits match the
    base within a stated bound on KL(base || bridged) per token (exactly for bits = 0).
    Measured: 8 bits 0.0004 nats (top-1 agreement 1.00), 4 bits 0.49 (0.72), 2 bits 2.0 (0.52)."""
    from carryon_ray.config import BridgeConfig
    from carryon_ray.data import arithmetic_problems
    from carryon_ray.embedding import calibrate_bridges

    base = smol_fp32
    calib = base.tokenizer([r["question"] for r in arithmetic_problems(16)], return_tensors="pt", padding=True)
    (bridge,), = calibrate_bridges([base], BridgeConfig(bits=bits), calib["input_ids"], calib["attention_mask"], [])
    ids, mask = batch(base.tokenizer)
    states, _ = base.hidden_states(ids, mask)
    x_hat = bridge.roundtrip(states[0])
    got = torch.nn.functional.linear(x_hat, base.head_weight)[mask.bool()]
    ref = base.logits(ids, mask)[mask.bool()]
    if bits == 0:
        assert torch.equal(got, ref)
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
    top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean()
    print(f"bits={bits}: KL {kl.item():.4f} nats/token, top-1 agreement {top1.item():.3f}")
    assert kl.item() <= bound
