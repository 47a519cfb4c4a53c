"""Base access: loading paths, hidden states, fingerprints, the head read on its own."""

import pytest
import torch

from carryon_ray.base import BaseLoadError, FrozenBase, load_head, resolve_base_path
from carryon_ray.config import BaseModelConfig


def test_smollm2_alias_resolves_to_the_bundled_gguf(smol_dir):
    path, gguf = resolve_base_path(BaseModelConfig(name="smollm2-135m-instruct"))
    assert path == smol_dir and gguf is None  # converted once into the safetensors cache


def test_gguf_with_bitsandbytes_is_a_clear_error():
    with pytest.raises(BaseLoadError, match="cannot be combined with a GGUF"):
        resolve_base_path(BaseModelConfig(name="smollm2-135m-instruct", quantization="4bit"))


def test_missing_or_bad_base_paths(tmp_path):
    with pytest.raises(BaseLoadError, match="not found"):
        resolve_base_path(BaseModelConfig(name=str(tmp_path / "x.gguf")))
    with pytest.raises(BaseLoadError, match="no config.json"):
        resolve_base_path(BaseModelConfig(name=str(tmp_path)))


def test_hidden_states_layers_and_head(smol_fp32):
    ids = smol_fp32.tokenizer("The cat sat on the mat", return_tensors="pt")["input_ids"]
    states, _ = smol_fp32.hidden_states(ids, shallow=[0, 8, 30])
    deep, emb, l8, last = states
    assert torch.equal(emb, smol_fp32.model.get_input_embeddings()(ids))  # layer 0 = token embeddings
    # Hugging Face's last hidden state is already after the final norm: index num_layers is the
    # deep state itself, and it projects to exactly the base's logits.
    assert torch.equal(deep, last)
    assert torch.equal(torch.nn.functional.linear(deep, smol_fp32.head_weight), smol_fp32.logits(ids))
    assert not torch.equal(l8, deep)
    with pytest.raises(ValueError, match="out of range"):
        smol_fp32.hidden_states(ids, shallow=[31])


def test_load_head_reads_only_the_head(smol_dir, smol_fp32, tiny_dir, tiny_base):
    w, b = load_head(BaseModelConfig(name=smol_dir, dtype="float32"))
    assert torch.equal(w, smol_fp32.head_weight) and b is None
    w, _ = load_head(BaseModelConfig(name=tiny_dir, dtype="float32"))
    assert torch.equal(w, tiny_base.head_weight)


def test_fingerprint_is_dtype_independent(smol_fp32, smol_bf16, tiny_base):
    assert smol_fp32.fingerprint() == smol_bf16.fingerprint()
    assert smol_fp32.fingerprint().mismatch(tiny_base.fingerprint())


def test_bitsandbytes_8bit_base_runs_on_cpu(tiny_dir):
    base = FrozenBase.load(BaseModelConfig(name=tiny_dir, dtype="float32", quantization="8bit", device="cpu"))
    ids = base.tokenizer("hello there", return_tensors="pt")["input_ids"]
    states, _ = base.hidden_states(ids)
    assert states[0].shape == (1, ids.shape[1], 64) and torch.isfinite(states[0]).all()
