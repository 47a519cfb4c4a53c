"""Config errors name the field, the bad value and what is allowed."""

import pytest

from carryon_ray.config import ConfigError, load_config, validate_config


def test_missing_field_is_named():
    with pytest.raises(ConfigError) as e:
        validate_config({"train": {"epochs": 1}})
    assert "data: required field is missing" in str(e.value)


def test_unknown_key_is_named():
    with pytest.raises(ConfigError) as e:
        validate_config({"data": {"train": "x.jsonl"}, "train": {"epoch": 3}})
    msg = str(e.value)
    assert "train.epoch" in msg and "unknown key" in msg


def test_out_of_range_value_is_named():
    with pytest.raises(ConfigError) as e:
        validate_config({"data": {"train": "x.jsonl"}, "train": {"lr": -1}})
    assert "train.lr: bad value -1" in str(e.value)


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError) as e:
        validate_config({"data": {"train": "x.jsonl"}, "bridge": {"bits": 3}})
    msg = str(e.value)
    assert "bridge.bits" in msg and "3" in msg and "allowed" in msg


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="embed_actors_min"):
        validate_config({"data": {"train": "x"}, "resources": {"embed_actors_min": 3, "embed_actors_max": 2}})
    with pytest.raises(ConfigError, match="kv_heads"):
        validate_config({"data": {"train": "x"}, "carryon": {"kind": "transformer", "heads": 4, "kv_heads": 3}})


def test_yaml_file_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  train: builtin:arithmetic\ntrain:\n  epochs: 2\n")
    cfg = load_config(p, {"train.epochs": 5, "bridge.bits": 4})
    assert cfg.train.epochs == 5 and cfg.bridge.bits == 4
    p.write_text("- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_every_field_has_a_description():
    from pydantic import BaseModel

    from carryon_ray import config as c

    for name in dir(c):
        obj = getattr(c, name)
        if isinstance(obj, type) and issubclass(obj, BaseModel) and obj.__module__ == c.__name__:
            for field, info in obj.model_fields.items():
                assert info.description, f"{name}.{field} has no description"


def test_example_configs_validate():
    from pathlib import Path

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert configs
    for p in configs:
        load_config(p)


def test_head_rank_needs_the_inherited_head():
    assert validate_config({"data": {"train": "x.jsonl"}, "head": {"rank": 8}}).head.rank == 8
    with pytest.raises(ConfigError, match="head.rank"):
        validate_config({"data": {"train": "x.jsonl"}, "head": {"kind": "new", "rank": 8}})
