"""Adapter files: round trip, wrong base, truncated and tampered files."""

import json

import pytest
import torch

from carryon_ray.adapter import AdapterError, load_adapter, save_adapter
from carryon_ray.base import FrozenBase
from carryon_ray.config import BaseModelConfig, BridgeConfig
from carryon_ray.embedding import calibrate_bridges
from carryon_ray.bridge import Bridge
from carryon_ray.generation import CarryOnModel, generate_mixed
from conftest import make_tiny_base
from test_invariants import batch, random_carryon


@pytest.fixture()
def adapter(tmp_path, tiny_base):
    m = random_carryon(tiny_base, "transformer")
    m.set_alpha(0.8)
    ids, mask = batch(tiny_base.tokenizer)
    bridges = calibrate_bridges([tiny_base], BridgeConfig(bits=4, projection_dim=16), ids, mask, [0])
    path = save_adapter(tmp_path / "ad", m, bridges, [0], [tiny_base.fingerprint().to_dict()], "tiny", {"note": "x"})
    return path, CarryOnModel([tiny_base], m, bridges, [0])


def test_round_trip_gives_identical_outputs(adapter, tiny_base):
    path, original = adapter
    loaded = CarryOnModel.from_pretrained(tiny_base, path)
    ids, mask = batch(tiny_base.tokenizer)
    assert loaded.carryon.alpha == pytest.approx(0.8)
    for got, want in zip(loaded.adapter.bridges[0], original.adapter.bridges[0]):  # deep and layer-0 streams
        assert got.bits == 4 and torch.equal(got.projection, want.projection)
        assert torch.equal(got.channel_scale, want.channel_scale)
    assert not torch.equal(loaded.adapter.bridges[0][0].projection, loaded.adapter.bridges[0][1].projection)
    assert torch.equal(loaded.logits(ids, mask), original.logits(ids, mask))
    files = sorted(p.name for p in path.iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_other_base_is_refused(adapter, tmp_path, smol_dir):
    path, _ = adapter
    other = FrozenBase.load(BaseModelConfig(name=make_tiny_base(tmp_path / "other", smol_dir, seed=7), dtype="float32"))
    with pytest.raises(AdapterError, match="head_sha"):
        CarryOnModel.from_pretrained(other, path)


def test_truncated_file_fails_cleanly(adapter, tiny_base):
    path, _ = adapter
    w = path / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(AdapterError, match="checksum"):
        CarryOnModel.from_pretrained(tiny_base, path)


def test_tampered_file_fails_cleanly(adapter, tiny_base):
    path, _ = adapter
    w = path / "adapter_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="checksum"):
        CarryOnModel.from_pretrained(tiny_base, path)
    # Even with a matching hash, a corrupt safetensors header is an AdapterError, not a crash.
    cfg = json.loads((path / "adapter_config.json").read_text())
    w.write_bytes(b"\x00" * 64)
    import hashlib

    cfg["weights_sha256"] = hashlib.sha256(b"\x00" * 64).hexdigest()
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="cannot be loaded"):
        load_adapter(path, None, tiny_base.head_weight)


def test_bad_config_json(adapter, tiny_base):
    path, _ = adapter
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="unreadable"):
        CarryOnModel.from_pretrained(tiny_base, path)
    (path / "adapter_config.json").write_text('{"format": "pickle"}')
    with pytest.raises(AdapterError, match="not a carryon-adapter"):
        CarryOnModel.from_pretrained(tiny_base, path)


def test_hugging_face_style_directory_and_model_card(adapter, tiny_base, tiny_dir, tmp_path):
    """save_pretrained -> from_pretrained(dir) gives identical logits, the base found from the config."""
    path, original = adapter
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "tiny" and cfg["version"] == 2
    assert set(cfg["carryon"]) >= {"kind", "width", "layers", "heads", "kv_heads"}
    assert "experts" in cfg["carryon"] and "top_k" not in cfg["carryon"]  # only what this kind uses
    mlp_cfg = random_carryon(tiny_base, "mlp").arch.used_fields()
    assert "heads" not in mlp_cfg and "attention" not in mlp_cfg
    saved = original.save_pretrained(tmp_path / "again", training={"val_loss_before": 2.5, "val_loss_after": 1.25})
    card = (saved / "README.md").read_text()
    assert f"base_model: {tiny_dir}" in card and "2.5000 (base) -> 1.2500" in card and "from_pretrained" in card
    assert json.loads((saved / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_dir
    alone = CarryOnModel.from_pretrained(str(saved))  # the base comes from base_model_name_or_path
    ids, mask = batch(tiny_base.tokenizer)
    assert torch.equal(alone.logits(ids, mask), original.logits(ids, mask))
    assert alone.base.name == tiny_dir


def test_a_version_1_adapter_still_loads(adapter, tiny_base):
    """carryon-ray 0.1 wrote adapter.safetensors and the whole arch under "arch": still readable."""
    path, original = adapter
    cfg = json.loads((path / "adapter_config.json").read_text())
    old = {k: v for k, v in cfg.items() if k not in ("carryon", "base_model_name_or_path", "library",
                                                      "library_version", "trainable_params")}
    old.update(version=1, arch=original.carryon.arch.model_dump(), tokenizer="tiny")
    (path / "adapter_model.safetensors").rename(path / "adapter.safetensors")
    (path / "README.md").unlink()
    (path / "adapter_config.json").write_text(json.dumps(old))
    loaded = CarryOnModel.from_pretrained(tiny_base, path)
    ids, mask = batch(tiny_base.tokenizer)
    assert torch.equal(loaded.logits(ids, mask), original.logits(ids, mask))
    old["version"] = 3
    (path / "adapter_config.json").write_text(json.dumps(old))
    with pytest.raises(AdapterError, match="version 3 is not supported.*upgrade carryon-ray"):
        CarryOnModel.from_pretrained(tiny_base, path)


def test_a_head_correction_round_trips_and_serves_per_row_alpha(tmp_path, tiny_base):
    """head.rank travels in the adapter config and weights; the decode engine (rows of one adapter at
    different alphas in one batch) gives what full recomputation gives, and alpha 0 the base's tokens."""
    m = random_carryon(tiny_base, "mlp", head_rank=4)
    torch.nn.init.normal_(m.correction.up.weight, std=1.0)  # strong enough to change greedy tokens
    m.set_alpha(0.5)
    path = save_adapter(tmp_path / "ad", m, [[Bridge(8), Bridge(8)]], [0], [tiny_base.fingerprint().to_dict()], "tiny")
    assert json.loads((path / "adapter_config.json").read_text())["head"] == {"kind": "inherited", "rank": 4}
    assert "rank-4 correction" in (path / "README.md").read_text()
    loaded = CarryOnModel.from_pretrained(tiny_base, path)
    ids, mask = batch(tiny_base.tokenizer)
    assert torch.equal(loaded.logits(ids, mask), CarryOnModel([tiny_base], m, [[Bridge(8), Bridge(8)]], [0]).logits(ids, mask))
    assert torch.equal(loaded.logits(ids, mask, alpha=0.0), tiny_base.logits(ids, mask))
    prompt = tiny_base.tokenizer("Once upon a time")["input_ids"]

    def recompute(alpha, n=6):
        seq = list(prompt)
        for _ in range(n):
            seq.append(int(loaded.logits(torch.tensor([seq]), alpha=alpha)[0, -1].argmax()))
        return seq[len(prompt):]

    # one batch, one adapter, two alphas: the engine projects the group with per-row alphas
    got = generate_mixed([tiny_base], [prompt, prompt], [loaded.adapter] * 2, 6, alphas=[0.0, 0.5], stop_at_eos=False)
    assert got[1] == recompute(0.5) and got[0] == recompute(0.0)
    assert got[0] == CarryOnModel([tiny_base]).generate([prompt], 6, stop_at_eos=False)[0]
    assert got[0] != got[1]



def test_a_hand_edited_adapter_config_names_the_bad_field(adapter, tiny_base):
    """adapter_config.json is a typed, versioned format: a wrong-typed field fails at load with the
    field's name, before any weight is read."""
    path, _ = adapter
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["alphas"] = "half"
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="invalid adapter config.*alphas"):
        CarryOnModel.from_pretrained(tiny_base, path)
    del cfg["weights_sha256"]
    cfg["alphas"] = [0.5]
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="weights_sha256: Field required"):
        CarryOnModel.from_pretrained(tiny_base, path)
