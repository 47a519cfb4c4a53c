"""Serving parts that need no cluster: text streaming with stop strings, the serve config schema,
API keys and the adapter catalog's access rules, and one engine batch."""

import hashlib

import pytest

from carryon_ray.config import ConfigError
from conftest import ROOT
from serve.access import ANONYMOUS, Catalog, load_keys, user_for
from serve.engine import Engine, RequestError, Row, TextStream
from serve.settings import AuthConfig, LimitsConfig, validate_serve_config


def stream_all(tok, ids, stop):
    ts = TextStream(tok, stop)
    parts = [ts.add(i) for i in ids]
    return parts, ts


def test_text_stream_deltas_add_up_to_the_decoded_text(tiny_base):
    tok = tiny_base.tokenizer
    ids = tok("Hello there, général Kenobi! 12 + 30 = 42 ✓", add_special_tokens=False)["input_ids"]
    parts, ts = stream_all(tok, ids, [])
    assert "".join(parts) + ts.flush() == tok.decode(ids)
    assert all("\ufffd" not in p for p in parts)  # multi-byte characters are never split


def test_text_stream_stops_at_a_string_spanning_tokens(tiny_base):
    tok = tiny_base.tokenizer
    ids = tok("The answer is 42.\nQuestion: next", add_special_tokens=False)["input_ids"]
    parts, ts = stream_all(tok, ids, ["\nQuestion:"])
    assert ts.stopped and ts.out == "The answer is 42."
    assert "".join(parts) == "The answer is 42."  # nothing of the stop string was ever sent
    assert not any("Question" in p for p in parts)


def test_serve_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"adapters.0.name"):
        validate_serve_config({"adapters": [{"name": "../etc", "source": "/x"}]})
    with pytest.raises(ConfigError, match="min_replicas must not exceed"):
        validate_serve_config({"replicas": {"min_replicas": 3, "max_replicas": 1}})
    with pytest.raises(ConfigError, match=r"limits.max_tokn: unknown key"):
        validate_serve_config({"limits": {"max_tokn": 3}})
    with pytest.raises(ConfigError, match="duplicate names"):
        validate_serve_config({"adapters": [{"name": "a", "source": "/x"}, {"name": "a", "source": "/y"}]})


def test_keys_from_file_and_env_keep_only_digests(tmp_path, monkeypatch):
    f = tmp_path / "keys.yaml"
    f.write_text(f"key-alice: alice\nsha256:{hashlib.sha256(b'key-bob').hexdigest()}: bob\n")
    monkeypatch.setenv("TEST_KEYS", "key-carol=carol")
    keys = load_keys(AuthConfig(keys_file=str(f), keys_env="TEST_KEYS"))
    assert "key-alice" not in keys and set(keys.values()) == {"alice", "bob", "carol"}
    assert user_for(keys, "Bearer key-alice", False) == "alice"
    assert user_for(keys, "Bearer key-bob", False) == "bob"
    assert user_for(keys, "bearer key-carol", False) == "carol"
    assert user_for(keys, "Bearer nope", False) is None
    assert user_for(keys, "Basic key-alice", False) is None
    assert user_for(keys, None, False) is None and user_for(keys, None, True) == ANONYMOUS
    monkeypatch.setenv("TEST_KEYS", "no-separator")
    with pytest.raises(ValueError, match="key=user"):
        load_keys(AuthConfig(keys_env="TEST_KEYS"))


def test_catalog_hides_other_users_adapters():
    cfg = validate_serve_config({
        "adapters": [{"name": "a1", "source": "/s/a1", "owner": "alice"},
                     {"name": "pub", "source": "/s/pub", "shared": True}],
        "registry": {"enabled": False},
    })
    cat = Catalog(cfg)
    assert cat.resolve("alice", "a1").source == "/s/a1"
    assert cat.resolve("bob", "a1") is None and cat.resolve("bob", "missing") is None  # indistinguishable
    assert cat.resolve("bob", "pub").mux_id == "pub"
    assert cat.resolve(ANONYMOUS, "a1") is None
    for bad in ("../a1", "a1/../../etc", "/s/a1", "a1\x00", ""):
        assert cat.resolve("alice", bad) is None
    assert cat.visible("alice") == ["a1", "pub"] and cat.visible("bob") == ["pub"]


def test_engine_batch_rows_and_limits(tiny_base):
    eng = Engine(tiny_base, LimitsConfig(max_prompt_tokens=40))
    with pytest.raises(RequestError, match="limit is 40"):
        eng.encode("word " * 50)
    with pytest.raises(RequestError, match="empty"):
        eng.encode("")
    chat = eng.encode(messages=[{"role": "user", "content": "hi"}])
    assert chat[-3:] == tiny_base.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"][-3:]
    ids = eng.encode("hello there")
    rows = eng.run([Row(ids, max_tokens=5), Row(ids, max_tokens=3, stop=[])])
    assert [r.completion_tokens for r in rows] == [5, 3]
    assert rows[0].finish_reason == "length" and rows[1].text and rows[0].text.startswith(rows[1].text)


def test_build_reads_yaml_args_and_pins_replicas(tmp_path):
    """`serve run serve.app:build config=FILE key=value` and the deploy file's args build the same
    application; resources and scaling come from config."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serve.app import build

    deploy = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    ServeDeploySchema.model_validate(deploy)  # Serve's own schema for `serve deploy`
    args = deploy["applications"][0]["args"]
    args["auth"].pop("keys_file")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(args))
    app = build({"config": str(tmp_path / "s.yaml"), "limits.max_tokens": "128", "gateway": {"replicas": 1}})
    gateway = app._bound_deployment
    model = gateway.init_args[0]._bound_deployment
    settings = model.init_args[0]
    assert settings["limits"]["max_tokens"] == 128 and gateway.num_replicas == 1
    opts = model.ray_actor_options
    assert opts["resources"] == {"inference_node": 1.0} and opts["num_gpus"] == 0.5
    assert model._deployment_config.autoscaling_config.max_replicas == 4
    with pytest.raises(ConfigError, match="limits.max_tokens"):
        build({"limits.max_tokens": "lots"})
