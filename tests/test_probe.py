"""The layer probe: Macro Influence equals what Hugging Face gives with the block really removed,
and the shortcut gain behaves on a base whose layers are known (the CLI run is in test_job.py)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from carryon_ray.probe import calibration_batch, macro_influence, probe, shortcut_gain


@pytest.mark.parametrize("block", [0, 1])
def test_macro_influence_equals_removing_the_block_in_hugging_face(tiny_base, block):
    ids, mask = calibration_batch(tiny_base, "builtin:arithmetic", 300, max_length=128)
    influence = macro_influence(tiny_base, ids, mask)
    assert len(influence) == tiny_base.num_layers
    cut = copy.deepcopy(tiny_base.model)
    del cut.model.layers[block]
    with torch.no_grad():
        full = tiny_base.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        without = cut.model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    want = 1 - F.cosine_similarity(full[real], without[real], dim=-1).mean()
    assert influence[block] == pytest.approx(float(want), abs=1e-5)
    assert influence[block] > 1e-4  # a random block does change the output


def test_shortcut_gain_finds_information_the_top_layer_lost(tiny_base):
    ids, mask = calibration_batch(tiny_base, "builtin:arithmetic", 1500, max_length=128)
    base_loss, top_only, gain, control = shortcut_gain(tiny_base, ids, mask, [0, 1])
    assert base_loss > 0 and 0 <= top_only < 1
    # The token embeddings (layer 0) hold the current token, which a random 2-block model's top
    # state has largely scrambled: they explain more of the next-token gradient than noise does.
    assert gain[0] > control
    assert abs(control) < 0.05


def test_probe_rejects_layers_the_base_does_not_have(tiny_base):
    with pytest.raises(ValueError, match="out of range: the base has blocks 0..1"):
        probe(tiny_base, "builtin:arithmetic", 200, layers=[0, 5])
