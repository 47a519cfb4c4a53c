"""The recycled-top carry-on (carryon.kind: recycled): the base's own top k blocks with low-rank deltas,
trained on the cached state entering block L - k, served inside the base's forward, exported as PEFT LoRA."""

import json
import subprocess
import sys

import pytest
import torch

from carryon_ray.config import ConfigError, resolve_tap
from carryon_ray.generation import Adapter, CarryOnModel, generate_mixed
from carryon_ray.train import build_carryon, evaluate, make_optimizer, train_step
from conftest import ROOT, make_config, make_tiny_base

PROMPTS = ["Question: Tom has 3 apples and buys 4 more. How many apples?\nAnswer:", "The capital of France is"]


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory, smol_dir):
    """A tiny random Llama with 4 blocks (so depth 2 is a real top, not the whole stack)."""
    return make_tiny_base(tmp_path_factory.mktemp("tiny-deep"), smol_dir, seed=3, layers=4)


@pytest.fixture(scope="module")
def deep_base(deep_dir):
    from carryon_ray.base import FrozenBase
    from carryon_ray.config import BaseModelConfig

    return FrozenBase.load(BaseModelConfig(name=deep_dir, dtype="float32"))


def recycled(base_dir, base, depth=2, rank=4, seed=0, noise=0.05, **carryon):
    cfg = make_config(base={"name": base_dir}, carryon={"kind": "recycled", "depth": depth, "rank": rank, **carryon})
    m = build_carryon(cfg, [base.hidden_size], base.vocab_size, base.head_weight, base.head_bias)
    if noise:
        torch.manual_seed(seed)
        for p in m.deltas.parameters():  # B != 0, so the deltas act and the tests mean something
            torch.nn.init.normal_(p, std=noise)
    return cfg, m


def batch(tok, padding_side="left"):
    enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side=padding_side)
    return enc["input_ids"], enc["attention_mask"]


def test_config_defaults_and_rules():
    cfg = make_config(carryon={"kind": "recycled", "depth": 8})
    assert cfg.bridge.bits == 8 and cfg.alpha.init == 1.0  # the measured bridge default; deltas unscaled at the start
    assert cfg.tap_spec() == (8, None)
    assert make_config(carryon={"kind": "recycled"}, bridge={"bits": 0}).bridge.bits == 0  # an explicit choice stays
    assert make_config().tap_spec() == (0, None)
    with pytest.raises(ConfigError, match="carryon.depth: bad value 31"):
        resolve_tap(31, None, 30)
    with pytest.raises(ConfigError, match="layers.tap: bad value 20.*entering block 22"):
        resolve_tap(8, 20, 30)
    assert resolve_tap(8, 22, 30) == 22 and resolve_tap(0, None, 30) is None
    for bad, field in [({"layers": {"shallow": [0]}}, "layers.shallow"), ({"head": {"rank": 4}}, "head.rank"),
                       ({"bridge": {"projection_dim": 16}}, "bridge.projection_dim"),
                       ({"carryon": {"kind": "recycled", "stages": 2}}, "carryon.stages")]:
        with pytest.raises(ConfigError, match=field):
            make_config(**{"carryon": {"kind": "recycled"}, **bad})
    with pytest.raises(ConfigError, match="layers.tap"):
        make_config(layers={"tap": 3})  # the tap belongs to the recycled kind
    # a search trains every trial on the states embedded once: one tap per search
    with pytest.raises(ConfigError, match="tune.space.carryon.depth"):
        make_config(carryon={"kind": "recycled"}, tune={"trials": 2, "space": {"carryon.depth": [4, 8]}})
    ok = make_config(carryon={"kind": "recycled"}, tune={"trials": 2, "space": {"carryon.rank": [4, 16]}})
    assert ok.tune.space == {"carryon.rank": [4, 16]}


def test_a_depth_past_the_base_fails_naming_the_field(deep_dir, deep_base):
    with pytest.raises(ConfigError, match="carryon.depth: bad value 5; the base has 4 blocks"):
        recycled(deep_dir, deep_base, depth=5)
    from carryon_ray.embedding import calibrate, token_rows
    from carryon_ray.data import Example

    rows = token_rows([Example([1, 2, 3], [1, 2, 3], "k")])
    cfg = make_config(base={"name": deep_dir}, carryon={"kind": "recycled", "depth": 2}, layers={"tap": 1})
    with pytest.raises(ConfigError, match="layers.tap: bad value 1"):
        calibrate([deep_base], cfg.bridge, [], rows, cfg.tap_spec())


@pytest.mark.parametrize("which", ["deep", "smol_fp32"])
def test_partial_forward_on_cached_states_equals_the_full_forward(request, which, deep_dir, deep_base):
    base, path = (deep_base, deep_dir) if which == "deep" else (request.getfixturevalue("smol_fp32"),
                                                              request.getfixturevalue("smol_dir"))
    depth = 2 if which == "deep" else 4
    _, m = recycled(path, base, depth=depth, noise=0)  # zero deltas: B = 0 from the start
    ids, mask = batch(base.tokenizer, "right")
    (h,), _ = base.hidden_states(ids, mask, tap=base.num_layers - depth)
    with torch.no_grad():
        for alpha in (0.0, 1.0):  # alpha = 0 skips the deltas; alpha = 1 adds B A = 0
            x = m([[h]], alpha=alpha)
            got = m.logits(x)
            keep = mask.bool()
            ref = base.logits(ids, mask)
            assert (got[keep] - ref[keep]).abs().max() <= 1e-5


@pytest.mark.parametrize("which", ["deep", "smol_fp32", "smol_bf16"])
def test_alpha_zero_is_the_base_bit_for_bit(request, which, deep_dir, deep_base):
    base = deep_base if which == "deep" else request.getfixturevalue(which)
    path = deep_dir if which == "deep" else request.getfixturevalue("smol_dir")
    _, m = recycled(path, base, depth=2)
    model = CarryOnModel([base], m)
    ids, mask = batch(base.tokenizer)
    ref = base.logits(ids, mask)
    out = model.logits(ids, mask, alpha=0.0)
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    assert not torch.equal(model.logits(ids, mask, alpha=1.0), ref)  # the deltas act at alpha > 0
    # the wrappers stay on the base but with nothing bound the base is untouched
    assert torch.equal(base.logits(ids, mask), ref)


def test_training_moves_only_the_deltas_and_alpha_scores_each_candidate(deep_dir, deep_base):
    cfg, m = recycled(deep_dir, deep_base, depth=2, noise=0)
    frozen = {k: v.clone() for k, v in m._blocks[0].state_dict().items()}
    ids, mask = batch(deep_base.tokenizer, "right")
    (h,), _ = deep_base.hidden_states(ids, mask, tap=2)
    labels = ids.masked_fill(mask == 0, -100)
    opt, sched = make_optimizer(m, cfg, 5)
    step0 = evaluate(m, [([[h]], labels)], [0.0, 1.0])
    assert step0[0.0] == pytest.approx(step0[1.0], abs=1e-6)  # B = 0: the carry-on starts as the base
    for _ in range(5):
        train_step(m, opt, sched, [[h]], labels, 64, 1.0)
    assert all(torch.equal(v, frozen[k]) for k, v in m._blocks[0].state_dict().items())  # copies untouched
    assert any(float(p.detach().abs().sum()) > 0 for n, p in m.named_parameters() if n.endswith(".B"))
    after = evaluate(m, [([[h]], labels)], [0.0, 0.5, 1.0])
    assert after[0.0] == pytest.approx(step0[0.0], abs=1e-6) and after[1.0] < after[0.0]
    # replay rows: the KL reference is the base's own final state, so at the start the KL is 0
    _, fresh = recycled(deep_dir, deep_base, depth=2, noise=0)
    opt, sched = make_optimizer(fresh, cfg, 1)
    out = train_step(fresh, opt, sched, [[h]], labels, 64, 1.0, replay=torch.tensor([True, False]))
    assert out.kl == pytest.approx(0.0, abs=1e-6)


def test_adapter_round_trip_holds_only_deltas(tmp_path, deep_dir, deep_base):
    from carryon_ray.adapter import load_adapter, save_adapter
    from carryon_ray.bridge import Bridge
    from safetensors.torch import load_file

    _, m = recycled(deep_dir, deep_base, depth=2)
    m.set_alpha(0.7)
    path = save_adapter(tmp_path / "a", m, [[Bridge(0)]], [], [deep_base.fingerprint().to_dict()], deep_dir)
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["carryon"] == {"kind": "recycled", "depth": 2, "rank": 4, "targets": list(m.arch.targets)}
    assert cfg["tap"] == 2 and cfg["num_layers"] == 4
    keys = set(load_file(str(path / "adapter_model.safetensors")))
    assert keys == {"alphas"} | {f"deltas.{j}.{t}.{ab}" for j in range(2) for t in m.arch.targets for ab in "AB"}
    assert "recycled: top 2 blocks" in (path / "README.md").read_text()
    loaded, _, _ = load_adapter(path, [deep_base.fingerprint().to_dict()], deep_base.head_weight)
    assert loaded.alpha == pytest.approx(0.7)
    ids, mask = batch(deep_base.tokenizer)
    want = CarryOnModel([deep_base], m).logits(ids, mask)
    got = CarryOnModel.from_pretrained(deep_base, path).logits(ids, mask)
    assert torch.equal(got, want)


def test_mixed_steps_equal_each_row_decoded_alone(tmp_path, deep_dir, deep_base):
    """Base rows, MLP carry-on rows and two recycled adapters in one engine step, rows joining and
    leaving (different lengths): every row's greedy tokens equal its adapter decoded alone."""
    from carryon_ray.adapter import save_adapter
    from carryon_ray.bridge import Bridge

    paths = []
    for seed, depth in ((1, 2), (2, 3)):
        _, m = recycled(deep_dir, deep_base, depth=depth, seed=seed, noise=0.2)
        paths.append(save_adapter(tmp_path / f"r{seed}", m, [[Bridge(0)]], [], [deep_base.fingerprint().to_dict()],
                                  deep_dir))
    mcfg = make_config(base={"name": deep_dir}, carryon={"kind": "mlp", "width": 16}, alpha={"init": 1.0})
    mlp = build_carryon(mcfg, [deep_base.hidden_size], deep_base.vocab_size, deep_base.head_weight)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.1)
    paths.append(save_adapter(tmp_path / "mlp", mlp, [[Bridge(8)]], [], [deep_base.fingerprint().to_dict()], deep_dir))
    adapters = [Adapter.load(deep_base, p) for p in paths]
    tok = deep_base.tokenizer
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in
               ["Question: two plus two?", "Hello", "The capital of France is", "A", "Sentence: rain fell.", "x y z"]]
    which = [0, 1, None, 2, 0, 1]
    rows = [None if w is None else adapters[w] for w in which]
    lengths = [9, 4, 7, 12, 5, 10]
    got = generate_mixed(deep_base, prompts, rows, max_new_tokens=lengths, stop_at_eos=False)
    for p, w, n, g in zip(prompts, which, lengths, got):
        alone = CarryOnModel([deep_base]) if w is None else CarryOnModel.from_pretrained(deep_base, paths[w])
        assert g == alone.generate([p], n, stop_at_eos=False)[0]
    # alpha = 0 on a recycled row is the bare base, token for token
    bare = CarryOnModel([deep_base]).generate([prompts[0]], 6, stop_at_eos=False)[0]
    assert generate_mixed(deep_base, prompts[:1], [adapters[0]], 6, alphas=[0.0], stop_at_eos=False)[0] == bare
    assert generate_mixed(deep_base, prompts[:1], [adapters[0]], 6, stop_at_eos=False)[0] != bare


def test_peft_export_gives_our_logits(tmp_path, deep_dir, deep_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from carryon_ray.adapter import save_adapter
    from carryon_ray.bridge import Bridge
    from carryon_ray.export import export_peft

    _, m = recycled(deep_dir, deep_base, depth=3, noise=0.1)
    m.set_alpha(0.6)
    path = save_adapter(tmp_path / "a", m, [[Bridge(0)]], [], [deep_base.fingerprint().to_dict()], deep_dir)
    out = export_peft(path, tmp_path / "peft")
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["layers_to_transform"] == [1, 2, 3] and conf["r"] == 4 and conf["lora_alpha"] == pytest.approx(2.4)
    hf = AutoModelForCausalLM.from_pretrained(deep_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, str(out)).eval()
    ids, mask = batch(deep_base.tokenizer)
    ours = CarryOnModel.from_pretrained(deep_base, path).logits(ids, mask)
    from carryon_ray.base import positions_from_mask

    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    keep = mask.bool()
    assert (ours[keep] - theirs[keep]).abs().max() <= 1e-4
    base_logits = deep_base.logits(ids, mask)
    assert (ours[keep] - base_logits[keep]).abs().max() > 1e-3  # the export carries a real change


def test_peft_export_names_a_loadable_base_and_loads_from_its_directory_alone(tmp_path, smol_dir, smol_fp32):
    """The bundled SmolLM2 is a Q4_1 GGUF: the export refuses to name the alias, and with --with-base
    writes the exact dequantized base beside it, so peft loads the pair from the export alone."""
    from peft import AutoPeftModelForCausalLM

    from carryon_ray.adapter import AdapterError, save_adapter
    from carryon_ray.base import SMOLLM2_ALIAS, positions_from_mask
    from carryon_ray.bridge import Bridge
    from carryon_ray.export import export_peft

    _, m = recycled(smol_dir, smol_fp32, depth=2, rank=4, noise=0.05)
    m.set_alpha(0.8)
    path = save_adapter(tmp_path / "a", m, [[Bridge(0)]], [], [smol_fp32.fingerprint().to_dict()], SMOLLM2_ALIAS)
    with pytest.raises(AdapterError, match="pass --with-base DIR"):
        export_peft(path, tmp_path / "refused")
    res = subprocess.run([sys.executable, "-m", "carryon_cli", "export", str(path), str(tmp_path / "cli")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode != 0 and "--base-path" in res.stderr
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())
    out = export_peft(path, tmp_path / "peft", with_base=tmp_path / "base")
    meta = json.loads((out / "carryon_export.json").read_text())
    assert meta["base_model_name_or_path"] == str((tmp_path / "base").resolve()) and meta["trained_on"] == SMOLLM2_ALIAS
    assert meta["base_fingerprint"] == smol_fp32.fingerprint().to_dict()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == meta["base_model_name_or_path"]
    assert smol_fp32.fingerprint().to_dict()["head_sha"] in (out / "README.md").read_text()
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()  # the directory alone
    ids, mask = batch(smol_fp32.tokenizer)
    ours = CarryOnModel.from_pretrained(smol_fp32, path).logits(ids, mask)
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    keep = mask.bool()
    assert (ours[keep] - theirs[keep]).abs().max() <= 1e-4
    assert (ours[keep] - smol_fp32.logits(ids, mask)[keep]).abs().max() > 1e-3  # a real change, carried over
    named = export_peft(path, tmp_path / "named", base_path="my-org/smollm2-q4_1-dequantized")
    assert json.loads((named / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "my-org/smollm2-q4_1-dequantized"
