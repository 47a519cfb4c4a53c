"""Serving parts that need no cluster: text streaming with stop strings, the serve config schema,
API keys and the adapter catalog's access rules, and the serving engine's thread and limits."""

import hashlib
import time

import numpy as np
import pytest

from carryon_ray.config import ConfigError
from conftest import ROOT
from serve.access import ANONYMOUS, Catalog, load_keys, user_for
from serve.async_engine import AsyncEngine, TextStream
from serve.protocol import GenerateRequest, GenerateResult, ServeError, StreamDelta
from serve.settings import AuthConfig, EngineConfig, LimitsConfig, validate_serve_config


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


def test_a_row_ending_inside_a_character_sends_its_bytes_at_the_end(tiny_base):
    """A row cut by max_tokens between the bytes of one character: the held-back bytes are sent at
    its end as U+FFFD, so the completion's text is the decode of its tokens (a random model emits
    such byte tokens in any order); a later byte that completes the character sends it whole."""
    tok = tiny_base.tokenizer
    ids = tok("ab", add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("Ã")]  # 0xC3: é's first byte
    parts, ts = stream_all(tok, ids, [])
    assert parts[-1] == "" and "\ufffd" in tok.decode(ids)  # held back while the row runs
    assert "".join(parts) + ts.flush() == tok.decode(ids) == ts.out
    parts, ts = stream_all(tok, ids + [tok.convert_tokens_to_ids("©")], [])  # 0xA9 completes it
    assert parts[-1] == "é" and ts.flush() == "" and ts.out == "abé"


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


def test_catalog_does_the_same_work_for_missing_and_not_yours():
    """A lookup resolves the caller's visible set first: a name that exists but is not theirs and
    a name that exists nowhere cost the same (no registry call for either), and the per-user
    cache is bounded."""
    cfg = validate_serve_config({
        "adapters": [{"name": "a1", "source": "/s/a1", "owner": "alice"}],
        "registry": {"enabled": False, "cache_size": 2},
    })
    cat = Catalog(cfg)
    cat.visible("bob")
    calls = cat.registry_calls
    assert cat.resolve("bob", "a1") is None and cat.resolve("bob", "nowhere") is None
    assert cat.registry_calls == calls
    for user in ("u1", "u2", "u3", "u4"):
        cat.visible(user)
    assert len(cat._visible) == 2  # LRU-bounded


def _request(**kw) -> GenerateRequest:
    return GenerateRequest(**{"model": "base", "max_tokens": 5, "temperature": 0.0, "top_p": 1.0, **kw})


def test_serving_engine_limits_and_tokenizer_errors(tiny_base):
    eng = AsyncEngine([tiny_base], LimitsConfig(max_prompt_tokens=80), EngineConfig())  # a chat's system prompt fits
    try:
        with pytest.raises(ServeError, match="limit is 80") as e:
            eng.encode("word " * 100)
        assert e.value.status == 400
        with pytest.raises(ServeError, match="empty"):
            eng.encode("")
        with pytest.raises(ServeError, match="cannot be tokenized") as e:  # a lone surrogate: 400, not 500
            eng.encode("\ud800 hi")
        assert e.value.status == 400 and e.value.param == "prompt"
        with pytest.raises(ServeError, match="cannot be tokenized") as e:
            eng.encode(messages=[{"role": "user", "content": "x\ud800"}])
        assert e.value.param == "messages"
        with pytest.raises(ServeError, match="outside the vocabulary"):
            eng.encode([1, 2, 10**9])
        with pytest.raises(ServeError, match="exceeds the base's context"):
            eng.encode("hello", max_tokens=10**6)
        chat = eng.encode(messages=[{"role": "user", "content": "hi"}])
        assert chat[-3:] == tiny_base.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"][-3:]
        assert eng.encode([5, 6, 7]) == [5, 6, 7]
    finally:
        eng.close()


def test_serving_engine_streams_text_and_retires_cancelled_rows(tiny_base):
    """Rows run on the engine's own thread; text arrives as deltas ending in the result; a cancelled
    generation leaves the engine at its next step."""
    import asyncio

    eng = AsyncEngine([tiny_base], LimitsConfig(), EngineConfig(max_rows=4))

    async def main():
        ids = eng.encode("hello there")
        short = eng.submit(_request(max_tokens=5), ids, None)
        items = [item async for item in short.stream()]
        assert isinstance(items[-1], GenerateResult) and items[-1].completion_tokens == 5
        assert "".join(i.text for i in items[:-1]) == items[-1].text
        assert all(isinstance(i, StreamDelta) for i in items[:-1])
        long = eng.submit(_request(max_tokens=900), ids, None)
        async for _ in long.stream():
            break  # the first delta: the row is running
        long.cancel()
        for _ in range(200):
            if eng.stats()["running_rows"] == 0:
                break
            await asyncio.sleep(0.01)
        stats = eng.stats()
        assert stats["running_rows"] == 0 and stats["finished"].get("cancelled") == 1
        assert len(long.seq.tokens) < 900

    try:
        asyncio.run(main())
    finally:
        eng.close()


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


def test_a_row_whose_text_cannot_be_made_fails_alone_with_its_reason(tiny_base):
    """A detokenizer error ends that row as an error (500 with the reason), not as a truncated
    success (before: finish_reason "stop" with 200); a row beside it completes normally."""
    import asyncio

    class Broken:  # the base's tokenizer, except that decoding raises (for one request's stream only)
        def __init__(self, tok):
            self.tok = tok

        def decode(self, *args, **kwargs):
            raise ValueError("token id has no text")

    eng = AsyncEngine([tiny_base], LimitsConfig(), EngineConfig(max_rows=4))

    async def main():
        ids = eng.encode("hello there")
        good_tok = eng.tokenizer
        eng.tokenizer = Broken(good_tok)
        bad = eng.submit(_request(max_tokens=20), ids, None)
        eng.tokenizer = good_tok
        ok = eng.submit(_request(max_tokens=6), ids, None)
        with pytest.raises(ServeError) as e:
            await bad.result()
        assert e.value.status == 500 and "detokenizing failed: ValueError: token id has no text" in str(e.value)
        result = await ok.result()
        assert result.completion_tokens == 6 and result.finish_reason == "length"
        assert eng.stats()["finished"].get("error") == 1

    try:
        asyncio.run(main())
    finally:
        eng.close()


def test_jobs_embedding_beside_users_rows_waits_its_turn_and_changes_no_token(tiny_base):
    """Co-serving on one replica's engine: a job's embedding chunks (run_beside) go between decode
    steps, at most one per step while users' rows decode; the users' tokens are those of the same
    requests without the job, and the job's rows are those a producer of its own makes."""
    import asyncio

    from carryon_ray.producer import Producer, Request
    from carryon_ray.config import BridgeConfig
    from carryon_ray.embedding import ROW_ID, ROW_INPUT_IDS, ROW_REPLAY, calibrate

    rows = [[5 + (7 * i + j) % 400 for j in range(6 + i % 5)] for i in range(24)]
    batch = {ROW_ID: list(range(24)), ROW_REPLAY: [False] * 24, ROW_INPUT_IDS: rows, "labels": rows}
    calib = calibrate([tiny_base], BridgeConfig(bits=8), [], [{k: batch[k][i] for k in batch} for i in range(8)])
    own = Producer([{}], None, bases=[tiny_base])
    own.register("job", calib)
    parts = [own.embed([Request("job", {k: v[at : at + 4] for k, v in batch.items()})])[0] for at in range(0, 24, 4)]
    want = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def decode(eng, with_job: bool):
        async def main():
            ids = [eng.encode(f"user {i} says hello") for i in range(3)]
            gens = [eng.submit(_request(max_tokens=12), x, None) for x in ids]
            chunks, steps_at = [], []
            if with_job:
                shared = Producer([{}], None, bases=[tiny_base])
                shared.register("job", calib)

                def chunk(at):
                    steps_at.append((eng.engine.stats.steps, eng.engine.has_work()))
                    return shared.embed([Request("job", {k: v[at : at + 4] for k, v in batch.items()})])[0]

                chunks = [eng.run_beside(lambda at=at: chunk(at)) for at in range(0, 24, 4)]
            results = [await g.result() for g in gens]
            return [r.text for r in results], await asyncio.gather(*chunks), steps_at

        return asyncio.run(main())

    eng = AsyncEngine([tiny_base], LimitsConfig(), EngineConfig(max_rows=4))
    try:
        alone, _, _ = decode(eng, False)
        texts, outs, steps_at = decode(eng, True)
    finally:
        eng.close()
    assert texts == alone  # greedy: the job changed no user's token
    got = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    assert got[ROW_ID].tolist() == want[ROW_ID].tolist()
    for k in want:
        if k.startswith("s0_"):  # the bridge codes, row by row
            assert [bytes(x) for x in got[k]] == [bytes(x) for x in want[k]], k
    # while users' rows were waiting or running, the next chunk came only after another decode step
    busy = [(a, b) for (a, users), (b, _) in zip(steps_at, steps_at[1:]) if users]
    assert len(busy) >= 2 and all(b > a for a, b in busy), steps_at


def test_beside_budget_keeps_jobs_to_their_share_of_the_decode_steps():
    """The co-serving budget without a model: steps of 20 ms, items costing 2 ms per token. The
    items' time after steps stays within `share` of the steps' time (one item's overshoot at
    most), no item waits for ever, the chunk size follows the measured times, and an idle engine
    takes whole chunks."""
    from serve.async_engine import BesideBudget

    for share in (0.25, 0.5, 1.0):
        b = BesideBudget(share, max_tokens=256)
        assert b.chunk_tokens(busy=True) == 256 and b.allows(64)  # nothing measured yet: run and learn
        b.spent(64 * 0.002, 64, after_step=False)  # learned on an idle engine: the users paid nothing
        assert b.share_used() == 0.0
        ran, steps_since = 0, 0
        for _ in range(500):
            b.stepped(0.020)
            steps_since += 1
            tokens = b.chunk_tokens(busy=True)
            if b.allows(tokens):
                b.spent(tokens * 0.002, tokens, after_step=True)
                ran, steps_since = ran + 1, 0
            assert steps_since <= int(1 / share) + 2  # a job never starves while users decode
        assert b.chunk_tokens(busy=True) == int(share * 0.020 / 0.002)  # about one step's share
        assert ran > 100 and b.share_used() <= share * 1.02 + 0.002 / 10, (share, b.share_used())
    # A row dearer than two steps' credit still runs, and the debt it leaves is repaid first.
    b = BesideBudget(0.5, max_tokens=256)
    b.spent(0.002 * 100, 100, after_step=False)
    b.stepped(0.010)
    while not b.allows(100):
        b.stepped(0.010)
    b.spent(0.200, 100, after_step=True)
    assert b.credit < 0 and not b.allows(1)
    assert b.chunk_tokens(busy=False) == 256


def test_the_engine_holds_jobs_to_their_share_while_users_decode(tiny_base):
    """A real engine decoding users' rows beside a queue of prompt-only items (each a fixed 10 ms
    of work reported as 32 tokens): after the first few steps (the costs are learned), the items'
    time stays near embed_share of the decode steps' time, every item still completes, and the
    items run back to back once no row decodes."""
    import asyncio

    for share in (0.25, 1.0):
        eng = AsyncEngine([tiny_base], LimitsConfig(), EngineConfig(max_rows=4, embed_share=share))
        try:
            async def main():
                gens = [eng.submit(_request(max_tokens=60), eng.encode(f"user {i} says hello"), None)
                        for i in range(3)]
                items = [eng.run_beside(lambda: time.sleep(0.01), tokens=32) for _ in range(400)]
                await asyncio.gather(*[g.result() for g in gens])
                during = eng.stats()
                await asyncio.gather(*items)
                return during

            during = asyncio.run(main())
        finally:
            eng.close()
        assert 0 < during["beside_done"] < 400  # the users finished first; the rest ran after
        assert during["beside_share"] <= share * 1.15 + 0.02, (share, during)
        assert eng.beside_done == 400
