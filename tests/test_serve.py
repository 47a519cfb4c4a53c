"""The Serve app on a real local cluster (its own Ray head and MLflow server, started and stopped
here), deployed with the real `carryon serve` CLI and exercised over real HTTP and with the official
openai client."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
import yaml

from carryon_ray.adapter import save_adapter
from carryon_ray.base import FrozenBase
from carryon_ray.bridge import Bridge
from carryon_ray.config import BaseModelConfig
from carryon_ray.generation import CarryOnModel
from conftest import ROOT
from jobs import local_cluster
from test_invariants import random_carryon
from test_recycled import recycled

pytestmark = pytest.mark.slow
KEYS = {"alice": "key-alice", "bob": "key-bob", "carol": "key-carol"}
PROMPT_A = "The quick brown fox jumps over"
PROMPT_B = "A slow green turtle walks under"  # same token count as PROMPT_A


def strong_adapter(base, kind, seed, out):
    m = random_carryon(base, kind)
    torch.manual_seed(seed)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=1.0)  # strong enough to change greedy tokens
    m.set_alpha(1.5)
    return save_adapter(out, m, [[Bridge(8), Bridge(8)]], [0], [base.fingerprint().to_dict()], "tiny")


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_dir):
    tmp = tmp_path_factory.mktemp("serve")
    base = FrozenBase.load(BaseModelConfig(name=tiny_dir, dtype="float32"))
    ads = {"alice-a": strong_adapter(base, "transformer", 1, tmp / "alice-a"),
           "bob-b": strong_adapter(base, "mlp", 2, tmp / "bob-b"),
           "shared-s": strong_adapter(base, "mlp", 3, tmp / "shared-s"),
           "reg-src": strong_adapter(base, "mlp", 4, tmp / "reg-src")}
    for name, depth, rank in (("alice-r4", 1, 4), ("alice-r8", 2, 8)):  # recycled adapters of two ranks
        _, m = recycled(tiny_dir, base, depth=depth, rank=rank, seed=rank, noise=0.5)
        ads[name] = save_adapter(tmp / name, m, [[Bridge(0)]], [], [base.fingerprint().to_dict()], "tiny")
    broken = tmp / "alice-broken"
    shutil.copytree(ads["alice-a"], broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64] + b"\0" * 64)  # tampered tail: checksum mismatch
    keys_file = tmp / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({KEYS["alice"]: "alice", KEYS["carol"]: "carol",
                                         "sha256:" + hashlib.sha256(KEYS["bob"].encode()).hexdigest(): "bob"}))
    cfg = {"base": {"name": tiny_dir, "dtype": "float32"}, "base_model_id": "tiny-base",
           "adapters": [{"name": "alice-a", "source": str(ads["alice-a"]), "owner": "alice"},
                        {"name": "bob-b", "source": str(ads["bob-b"]), "owner": "bob"},
                        {"name": "shared-s", "source": str(ads["shared-s"]), "shared": True},
                        {"name": "alice-broken", "source": str(broken), "owner": "alice"},
                        {"name": "alice-r4", "source": str(ads["alice-r4"]), "owner": "alice"},
                        {"name": "alice-r8", "source": str(ads["alice-r8"]), "owner": "alice"}],
           # Registry answers reused for the fixture's life: with 0, every request asked the one-worker
           # MLflow server first, and on a loaded machine those lookups queued long enough that four
           # requests sent at once reached the engine one after another (no test moves an alias here).
           "registry": {"refresh_s": 3600},
           "auth": {"keys_file": str(keys_file), "admins": ["alice"]},
           "limits": {"max_tokens": 900, "max_prompt_chars": 2000, "alpha_max": 2.0, "max_body_bytes": 20000,
                      "max_concurrent_per_key": 20},
           "engine": {"max_rows": 16, "prefill_tokens": 64},
           "replicas": {"num_cpus": 1, "max_adapters": 4}}
    (tmp / "serve.yaml").write_text(yaml.safe_dump(cfg))

    state_dir = tmp / "cluster"
    state = local_cluster.up(str(state_dir), num_cpus=4)
    try:
        # An adapter registered in the MLflow registry the way the customization job does it.
        from mlflow.tracking import MlflowClient

        client = MlflowClient(state["mlflow_url"])
        exp = client.create_experiment("serve-test")
        run = client.create_run(exp)
        client.log_artifacts(run.info.run_id, str(ads["reg-src"]), "adapter")
        client.create_registered_model("reg-alice", tags={"carryon.owner": "alice", "carryon.shared": "false"})
        mv = client.create_model_version("reg-alice", f"{run.info.artifact_uri}/adapter", run.info.run_id)
        client.set_registered_model_alias("reg-alice", "current", mv.version)
        client.set_terminated(run.info.run_id)

        port = local_cluster.free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        t0 = time.time()
        res = subprocess.run([sys.executable, "-m", "carryon_cli", "serve", str(tmp / "serve.yaml"),
                              "--state-dir", str(state_dir), "--port", str(port)],
                             capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        print(f"carryon serve: {time.time() - t0:.1f}s")
        yield {"url": f"http://127.0.0.1:{port}", "base": base, "adapters": ads, "state": state}
        # `carryon serve --stop` leaves nothing listening on the port (controller and proxy included).
        stop = subprocess.run([sys.executable, "-m", "carryon_cli", "serve", "--stop", "--state-dir", str(state_dir)],
                              capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
        assert stop.returncode == 0, stop.stderr[-2000:]
        import socket

        deadline = time.time() + 30
        while time.time() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) != 0:
                    break
            time.sleep(0.5)
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, "the port is still held after serve --stop"
    finally:
        assert local_cluster.down(str(state_dir))
        assert not local_cluster._stragglers(state["ray_temp_dir"])


def post(served, path, body, key="alice", **kw):
    headers = {"Authorization": f"Bearer {KEYS[key]}"} if key else {}
    return httpx.post(served["url"] + path, json=body, headers=headers, timeout=120, **kw)


def offline(served, model, prompt, n, **kw):
    """What CarryOnModel.generate gives for the same adapter, prompt and settings."""
    base = served["base"]
    m = CarryOnModel.from_pretrained(base, served["adapters"][model]) if model else CarryOnModel([base])
    ids = base.tokenizer(prompt)["input_ids"]
    out = m.generate([ids], n, **kw)[0]
    text = base.tokenizer.decode([t for t in out if t != base.tokenizer.eos_token_id], skip_special_tokens=True,
                                 clean_up_tokenization_spaces=False)
    return text, len(out), len(ids)


def assert_greedy_matches_alone(served, model, prompt, n, body, min_tokens=100, tie=1e-3):
    """A greedy row decoded in a changing batch equals the same row decoded alone, token for token,
    except where float sums in another batch shape flip a near-tie: the first difference must come
    late (a slot or cache bookkeeping error shows as soon as rows join or leave) and at a position
    where the two best logits of the single-row decode are within `tie` (random weights have a few
    of those in 600 tokens: the smallest top-2 gaps here are ~1e-4, the median ~0.15)."""
    base = served["base"]
    m = CarryOnModel.from_pretrained(base, served["adapters"][model])
    ids = base.tokenizer(prompt)["input_ids"]
    out = m.generate([ids], n)[0]
    got = body["choices"][0]["text"]

    def text(k):
        return base.tokenizer.decode([t for t in out[:k] if t != base.tokenizer.eos_token_id],
                                     skip_special_tokens=True, clean_up_tokenization_spaces=False)

    if got == text(len(out)):
        assert body["usage"]["completion_tokens"] == len(out)
        return
    k = next(k for k in range(len(out)) if not got.startswith(text(k + 1)))  # the first token that differs
    logits = m.logits(torch.tensor([ids + out]))[0, len(ids) - 1:-1]  # row j predicts out[j]
    top2 = logits.topk(2, dim=-1).values
    gaps = (top2[:, 0] - top2[:, 1])[max(0, k - 2): k + 2]  # a token's text may extend its neighbour's
    assert k >= min_tokens and gaps.min().item() < tie, (k, gaps.tolist())


def complete(served, model, prompt, key="alice", **kw):
    r = post(served, "/v1/completions", {"model": model, "prompt": prompt, "temperature": 0, **kw}, key=key)
    assert r.status_code == 200, r.text
    return r.json()


def test_api_generation_equals_carryon_model_generate(served):
    seen = set()
    for model, key in [("alice-a", "alice"), ("bob-b", "bob"), (None, "alice")]:
        body = complete(served, model or "tiny-base", PROMPT_A, key=key, max_tokens=12)
        text, n_out, n_in = offline(served, model, PROMPT_A, 12)
        choice = body["choices"][0]
        assert choice["text"] == text
        assert body["usage"] == {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
        assert choice["finish_reason"] == ("length" if n_out == 12 else "stop")
        assert body["object"] == "text_completion" and body["model"] == (model or "tiny-base")
        seen.add(text)
    assert len(seen) == 3  # two adapters and the base all answer differently
    # alpha = 0 is the base exactly.
    assert complete(served, "alice-a", PROMPT_A, max_tokens=12, carryon_alpha=0)["choices"][0]["text"] == \
        offline(served, None, PROMPT_A, 12)[0]
    # Seeded sampling equals the offline sampler with the same seed.
    body = complete(served, "bob-b", PROMPT_B, key="bob", max_tokens=10, seed=7, **{"temperature": 0.9, "top_p": 0.9})
    assert body["choices"][0]["text"] == offline(served, "bob-b", PROMPT_B, 10, temperature=0.9, top_p=0.9, seed=7)[0]


def stats(served) -> dict:
    r = httpx.get(served["url"] + "/v1/carryon/stats", headers={"Authorization": f"Bearer {KEYS['alice']}"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_recycled_adapters_of_two_ranks_beside_the_base_and_an_mlp_all_answer(served):
    """The reported failure, over HTTP: recycled adapters of ranks 4 and 8, the base and an MLP
    adapter sent at the same time (before: all four answered 500, on every retry). Each answers 200
    with what it gives alone."""
    import concurrent.futures

    prompt = "Sentence: rain fell on the harbor all night"
    models = ["alice-r4", "alice-r8", "tiny-base", "shared-s"]
    for _ in range(2):
        with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
            rs = list(pool.map(lambda m: post(served, "/v1/completions", {"model": m, "prompt": prompt,
                                                                         "max_tokens": 12, "temperature": 0}),
                               models))
        for model, r in zip(models, rs):
            assert r.status_code == 200, (model, r.text)
            want, n, _ = offline(served, None if model == "tiny-base" else model, prompt, 12)
            assert r.json()["choices"][0]["text"] == want, model
    texts = {r.json()["choices"][0]["text"] for r in rs}
    assert len(texts) == 4  # four models, four different continuations


def test_users_share_decoding_steps_and_get_their_own_outputs(served):
    n = 24  # tokens per request: long enough that four requests sent at once overlap on a loaded machine
    jobs = [("a", "alice-a", "alice", PROMPT_A), ("b", "bob-b", "bob", PROMPT_A),
            ("s", "shared-s", "carol", PROMPT_B), ("base", "tiny-base", "carol", PROMPT_B)]
    for _, model, key, prompt in jobs:  # adapters loaded first: a load would hold one request back
        complete(served, model, prompt, key=key, max_tokens=1)
    before = stats(served)
    results, spans = {}, {}
    start = threading.Barrier(len(jobs))

    def call(name, model, key, prompt):
        start.wait()
        t0 = time.monotonic()
        results[name] = complete(served, model, prompt, key=key, max_tokens=n)["choices"][0]["text"]
        spans[name] = (round(t0, 2), round(time.monotonic(), 2))

    threads = [threading.Thread(target=call, args=j) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = stats(served)
    tokens = after["generated_tokens"] - before["generated_tokens"]
    assert tokens == 4 * n
    # Rows of different users shared decoding steps (10-token requests once ran one after another
    # on a loaded CI machine: 40 steps for 40 tokens).
    assert after["steps"] - before["steps"] < tokens, f"no step shared; request spans: {spans}"
    assert results["a"] == offline(served, "alice-a", PROMPT_A, n)[0]
    assert results["b"] == offline(served, "bob-b", PROMPT_A, n)[0]
    assert results["s"] == offline(served, "shared-s", PROMPT_B, n)[0]
    assert results["base"] == offline(served, None, PROMPT_B, n)[0]
    assert results["a"] != results["b"]


def test_access_control(served):
    missing = post(served, "/v1/completions", {"model": "nobody-here", "prompt": "x"}, key="bob")
    other = post(served, "/v1/completions", {"model": "alice-a", "prompt": "x"}, key="bob")
    assert missing.status_code == other.status_code == 404
    assert missing.json()["error"]["message"].replace("nobody-here", "X") == \
        other.json()["error"]["message"].replace("alice-a", "X")  # another user's adapter reads as missing
    for name in ("../alice-a", "alice-a/../../etc/passwd", served["adapters"]["alice-a"].as_posix()):
        assert post(served, "/v1/completions", {"model": name, "prompt": "x"}).status_code == 404
    assert post(served, "/v1/completions", {"model": "alice-a", "prompt": "x"}, key=None).status_code == 401
    r = httpx.post(served["url"] + "/v1/completions", json={"model": "alice-a", "prompt": "x"},
                   headers={"Authorization": "Bearer not-a-key"}, timeout=60)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(served["url"] + "/v1/carryon/stats", headers={"Authorization": f"Bearer {KEYS['bob']}"}, timeout=60).status_code == 403

    def models(key):
        r = httpx.get(served["url"] + "/v1/models", headers={"Authorization": f"Bearer {KEYS[key]}"}, timeout=60)
        assert r.status_code == 200
        return {m["id"] for m in r.json()["data"]}

    assert models("alice") == {"tiny-base", "alice-a", "alice-broken", "shared-s", "reg-alice", "alice-r4", "alice-r8"}
    assert models("bob") == {"tiny-base", "bob-b", "shared-s"}
    assert models("carol") == {"tiny-base", "shared-s"}
    spec = httpx.get(served["url"] + "/openapi.json", timeout=60).json()  # FastAPI's generated document
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/healthz"} <= set(spec["paths"])
    assert "CompletionRequest" in json.dumps(spec["paths"]["/v1/completions"]["post"]["requestBody"])
    # The registry adapter serves its owner only, and equals the adapter it was registered from.
    body = complete(served, "reg-alice", PROMPT_A, max_tokens=8)
    assert body["choices"][0]["text"] == offline(served, "reg-src", PROMPT_A, 8)[0]
    assert post(served, "/v1/completions", {"model": "reg-alice", "prompt": "x"}, key="carol").status_code == 404


def test_openai_client_and_streaming_equal_non_streaming(served):
    import openai

    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key=KEYS["alice"], max_retries=0)
    assert {m.id for m in client.models.list()} >= {"alice-a", "tiny-base"}
    kw = dict(model="alice-a", max_tokens=16, temperature=0.8, seed=11, stop=["\n\n"])
    full = client.completions.create(prompt=PROMPT_A, **kw)
    parts = list(client.completions.create(prompt=PROMPT_A, stream=True, **kw))
    assert "".join(c.choices[0].text for c in parts) == full.choices[0].text
    assert parts[-1].choices[0].finish_reason == full.choices[0].finish_reason
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    chat = client.chat.completions.create(messages=msgs, model="shared-s", max_tokens=12, temperature=0)
    stream = client.chat.completions.create(messages=msgs, model="shared-s", max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content and chat.choices[0].message.role == "assistant"
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert chat.usage.prompt_tokens > 10  # the chat template was applied
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="bob-b", prompt="x", max_tokens=2)


BAD = [
    ("malformed JSON", b'{"model": "alice-a", "prompt": ', 400, "malformed JSON"),
    ("non-UTF-8 body", b'{"model": "alice-a", "prompt": "\xff\xfe"}', 400, "UTF-8"),
    ("unknown field", {"model": "alice-a", "prompt": "x", "max_token": 3}, 400, "max_token: unknown field"),
    ("wrong type", {"model": "alice-a", "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("missing prompt", {"model": "alice-a"}, 400, "prompt: required"),
    ("empty prompt", {"model": "alice-a", "prompt": ""}, 400, "empty"),
    ("over-long prompt", {"model": "alice-a", "prompt": "x" * 2001}, 400, "2000 characters"),
    ("max_tokens over limit", {"model": "alice-a", "prompt": "x", "max_tokens": 901}, 400, "limit of 900"),
    ("negative temperature", {"model": "alice-a", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ("alpha over max", {"model": "alice-a", "prompt": "x", "carryon_alpha": 2.5}, 400, "carryon_alpha"),
    ("n over limit", {"model": "alice-a", "prompt": "x", "n": 5}, 400, "n: at most 4"),
    ("unsupported field", {"model": "alice-a", "prompt": "x", "tools": []}, 400, "tools: unknown field"),
    ("penalty", {"model": "alice-a", "prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("logit bias", {"model": "alice-a", "prompt": "x", "logit_bias": {"5": 1}}, 400, "logit_bias"),
    ("lone surrogate", b'{"model": "alice-a", "prompt": "\\ud800 x"}', 400, "cannot be tokenized"),
    ("token id out of range", {"model": "alice-a", "prompt": [1, 99999999]}, 400, "outside the vocabulary"),
    ("streaming n > 1", {"model": "alice-a", "prompt": "x", "n": 2, "stream": True}, 400, "streaming takes n = 1"),
    ("unknown adapter", {"model": "no-such-adapter", "prompt": "x"}, 404, "does not exist"),
    ("body too large", {"model": "alice-a", "prompt": "x" * 30000}, 413, "bytes"),
    ("too many prompts", {"model": "alice-a", "prompt": ["a"] * 9}, 400, "prompts"),
    ("empty stop", {"model": "alice-a", "prompt": "x", "stop": [""]}, 400, "stop"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_a_4xx_with_a_reason_and_the_service_stays_up(served, case):
    _name, body, status, reason = case
    headers = {"Authorization": f"Bearer {KEYS['alice']}", "Content-Type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(served["url"] + "/v1/completions", content=content, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    assert reason in r.json()["error"]["message"]
    assert complete(served, "alice-a", "still up?", max_tokens=2)["usage"]["completion_tokens"] >= 1


def test_bad_chat_inputs(served):
    for body, reason in [({"model": "alice-a", "messages": []}, "messages"),
                         ({"model": "alice-a", "messages": [{"role": "robot", "content": "x"}]}, "role"),
                         ({"model": "alice-a", "messages": [{"role": "user"}]}, "content")]:
        r = post(served, "/v1/chat/completions", body)
        assert r.status_code == 400 and reason in r.json()["error"]["message"], r.text


def test_a_corrupt_adapter_fails_alone(served):
    r = post(served, "/v1/completions", {"model": "alice-broken", "prompt": PROMPT_A, "max_tokens": 4})
    assert r.status_code == 503, r.text
    msg = r.json()["error"]["message"]
    assert "checksum" in msg and str(served["adapters"]["alice-a"].parent) not in msg  # no server paths leak
    assert complete(served, "alice-a", PROMPT_A, max_tokens=4)["choices"][0]["text"] == offline(served, "alice-a", PROMPT_A, 4)[0]


def test_bounded_load_across_adapters(served):
    """20 concurrent clients for 30 s over loopback, four models: no 5xx, every body well formed."""
    plan = [("alice-a", "alice"), ("bob-b", "bob"), ("shared-s", "carol"), ("tiny-base", "carol"), ("reg-alice", "alice")]
    latencies, failures, lock = [], [], threading.Lock()
    deadline = time.time() + 30

    def client(i):
        with httpx.Client(timeout=120) as http:
            n = 0
            while time.time() < deadline:
                model, key = plan[(i + n) % len(plan)]
                n += 1
                t0 = time.perf_counter()
                r = http.post(served["url"] + "/v1/completions", headers={"Authorization": f"Bearer {KEYS[key]}"},
                              json={"model": model, "prompt": f"request {i}-{n}: {PROMPT_A}", "max_tokens": 8,
                                    "temperature": 0.7, "seed": n})
                dt = time.perf_counter() - t0
                ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length") \
                    and 1 <= r.json()["usage"]["completion_tokens"] <= 8
                with lock:
                    (latencies if ok else failures).append(dt if ok else (r.status_code, r.text[:200]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:5]
    q = statistics.quantiles(latencies, n=100)
    report = {"requests": len(latencies), "rps": round(len(latencies) / 30, 2), "p50_s": round(q[49], 3),
              "p95_s": round(q[94], 3), "p99_s": round(q[98], 3)}
    print("load test:", json.dumps(report))
    assert len(latencies) >= 20


# -- the decode engine under many users (issue 14) ----------------------------------------------


def _stream_lines(served, body, key="alice"):
    """An open streaming response (context manager) for a completion."""
    return httpx.stream("POST", served["url"] + "/v1/completions", json={**body, "stream": True},
                        headers={"Authorization": f"Bearer {KEYS[key]}"}, timeout=120)


def test_a_short_request_does_not_wait_for_long_ones(served):
    """Rows join the running decode at the next step and leave when done: a short request sent
    while long ones decode finishes first, and every row still equals its adapter alone."""
    done, results = [], {}

    def call(name, model, key, n):
        results[name] = complete(served, model, PROMPT_A, key=key, max_tokens=n)
        done.append(name)

    longs = [threading.Thread(target=call, args=(f"long-{m}", m, k, 600)) for m, k in [("alice-a", "alice"),
                                                                                       ("bob-b", "bob")]]
    for t in longs:
        t.start()
    base_steps = stats(served)["steps"]
    while stats(served)["steps"] < base_steps + 20:  # the long rows are decoding
        time.sleep(0.05)
    short = threading.Thread(target=call, args=("short", "shared-s", "carol", 4))
    short.start()
    for t in [short, *longs]:
        t.join()
    assert done[0] == "short", done
    assert results["short"]["choices"][0]["text"] == offline(served, "shared-s", PROMPT_A, 4)[0]
    for m in ("alice-a", "bob-b"):  # greedy output per row survives rows joining and leaving mid-generation
        assert_greedy_matches_alone(served, m, PROMPT_A, 600, results[f"long-{m}"])


def test_a_disconnected_stream_frees_its_row(served):
    before = stats(served)
    with _stream_lines(served, {"model": "alice-a", "prompt": PROMPT_A, "max_tokens": 900, "temperature": 0,
                                 "ignore_eos": True}) as r:  # still decoding when it hangs up
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk arrived: the row is decoding; now hang up
    deadline = time.time() + 30
    while time.time() < deadline:
        now = stats(served)
        if now["running_rows"] == 0 and now["finished"].get("cancelled", 0) > before["finished"].get("cancelled", 0):
            break
        time.sleep(0.1)
    assert now["running_rows"] == 0 and now["finished"].get("cancelled", 0) == before["finished"].get("cancelled", 0) + 1
    assert now["generated_tokens"] - before["generated_tokens"] < 900  # it did not decode to max_tokens
    assert complete(served, "alice-a", PROMPT_A, max_tokens=3)["usage"]["completion_tokens"] == 3  # admitted next


def test_a_poisoned_sampling_parameter_hurts_no_one(served):
    """Temperatures and top_p that float32 cannot represent decode (greedily) instead of failing the
    step: every concurrent request answers 200 with its own output."""
    results = {}

    def call(name, model, key, **kw):
        results[name] = post(served, "/v1/completions", {"model": model, "prompt": PROMPT_A, "max_tokens": 8, **kw},
                             key=key)

    jobs = [("tiny-temp", "alice-a", "alice", {"temperature": 5e-324}),
            ("tiny-top-p", "bob-b", "bob", {"temperature": 1.0, "top_p": 1e-300}),
            ("normal", "shared-s", "carol", {"temperature": 0})]
    threads = [threading.Thread(target=call, args=(n, m, k), kwargs=kw) for n, m, k, kw in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in results.values()), {n: r.text for n, r in results.items()}
    assert results["normal"].json()["choices"][0]["text"] == offline(served, "shared-s", PROMPT_A, 8)[0]
    assert results["tiny-temp"].json()["choices"][0]["text"] == offline(served, "alice-a", PROMPT_A, 8)[0]  # greedy
    assert results["tiny-top-p"].json()["choices"][0]["text"] == offline(served, "bob-b", PROMPT_A, 8)[0]  # top-1 only


def test_unseeded_sampling_draws_fresh_randomness(served):
    texts = {complete(served, "tiny-base", "Once upon a time", max_tokens=12, temperature=1.0)["choices"][0]["text"]
             for _ in range(5)}
    assert len(texts) > 1


def _raw(served, head: bytes, body_chunks=(), read_timeout=20.0) -> tuple[int, bytes, dict]:
    """Send raw HTTP on a socket: the head, then body chunks (chunked encoding, never terminated),
    and read whatever the server answers without sending the rest."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(served["url"])
    with socket.create_connection((u.hostname, u.port), timeout=read_timeout) as s:
        s.sendall(head)
        for chunk in body_chunks:
            s.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + 10:
            part = s.recv(65536)
            if not part:
                break
            data += part
    status = int(data.split(b" ", 2)[1])
    headers = dict(line.split(b": ", 1) for line in data.split(b"\r\n\r\n")[0].split(b"\r\n")[1:] if b": " in line)
    return status, data, {k.decode().lower(): v.decode() for k, v in headers.items()}


def test_chunked_bodies_are_bounded_and_authenticated_before_reading(served):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n")
    # No key: 401 at once, although not a byte of the body was sent.
    status, data, _ = _raw(served, head + b"\r\n")
    assert status == 401, data[:300]
    # A key, then a chunked body that never ends: 413 once the limit (20,000 bytes) is passed.
    status, data, _ = _raw(served, head + f"Authorization: Bearer {KEYS['alice']}\r\n\r\n".encode(),
                           [b"x" * 8000] * 4)
    assert status == 413 and b"20000 bytes" in data, data[:300]


def test_per_key_concurrency_is_limited_with_retry_after(served):
    """At most 20 requests in flight per key (the fixture's limit): 24 at once from one key, and the
    ones over the limit answer 429 with Retry-After while other keys are served."""
    results = []

    def call():
        results.append(post(served, "/v1/completions", {"model": "alice-a", "prompt": PROMPT_A, "max_tokens": 900,
                                                        "temperature": 0, "ignore_eos": True}))

    threads = [threading.Thread(target=call) for _ in range(24)]
    for t in threads:
        t.start()
    deadline = time.time() + 60
    while time.time() < deadline and stats(served)["running_rows"] < 20 and len(results) < 4:
        time.sleep(0.05)
    other = post(served, "/v1/completions", {"model": "bob-b", "prompt": "x", "max_tokens": 2}, key="bob")
    for t in threads:
        t.join()
    assert other.status_code == 200  # other keys are unaffected
    codes = sorted(r.status_code for r in results)
    assert codes.count(429) >= 4 and set(codes) == {200, 429}, codes
    limited = next(r for r in results if r.status_code == 429)
    assert int(limited.headers["retry-after"]) >= 1 and "in flight" in limited.json()["error"]["message"]
    assert all(r.json()["usage"]["completion_tokens"] == 900 for r in results if r.status_code == 200)
    assert post(served, "/v1/completions", {"model": "alice-a", "prompt": "x", "max_tokens": 2}).status_code == 200


def test_openai_compatibility_cases(served):
    """What the official client and LangChain/LlamaIndex-style bodies send."""
    import openai

    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key=KEYS["alice"], max_retries=0)
    assert client.models.retrieve("alice-a").id == "alice-a"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("bob-b")  # exists, not alice's: 404 like a missing one
    ids = served["base"].tokenizer(PROMPT_A)["input_ids"]
    by_ids = client.completions.create(model="alice-a", prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == offline(served, "alice-a", PROMPT_A, 6)[0]
    first = client.chat.completions.create(
        model="shared-s", temperature=0, max_tokens=6, presence_penalty=0, frequency_penalty=0, logit_bias={},
        logprobs=False, response_format={"type": "text"}, n=1,
        messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    echoed = first.choices[0].message.model_dump()  # refusal, annotations, audio, function_call, tool_calls: None
    second = client.chat.completions.create(model="shared-s", temperature=0, max_tokens=4, messages=[
        {"role": "user", "content": "Hi"}, echoed, {"role": "user", "content": "Again"}])
    assert second.choices[0].finish_reason in ("stop", "length")
    lp = client.completions.create(model="alice-a", prompt=PROMPT_A, max_tokens=4, temperature=0, logprobs=3)
    assert len(lp.choices[0].logprobs.token_logprobs) == 4 and len(lp.choices[0].logprobs.top_logprobs[0]) == 3
    assert all(v <= 0 for v in lp.choices[0].logprobs.token_logprobs)
    chat_lp = client.chat.completions.create(model="alice-a", messages=[{"role": "user", "content": "Hi"}],
                                             max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    assert len(chat_lp.choices[0].logprobs.content) == 3 and len(chat_lp.choices[0].logprobs.content[0].top_logprobs) == 2
    many = client.completions.create(model="shared-s", prompt=PROMPT_B, max_tokens=6, temperature=1.0, n=3, seed=5)
    assert [c.index for c in many.choices] == [0, 1, 2] and len({c.text for c in many.choices}) > 1
    # fields real clients send: store / metadata / service_tier are accepted (and ignored), penalties apply
    plain = client.completions.create(model="tiny-base", prompt=PROMPT_A, max_tokens=12, temperature=0)
    same = client.completions.create(model="tiny-base", prompt=PROMPT_A, max_tokens=12, temperature=0,
                                     extra_body={"store": False, "metadata": {"team": "ml"}, "service_tier": "auto"})
    assert same.choices[0].text == plain.choices[0].text
    penalized = client.completions.create(model="tiny-base", prompt=PROMPT_A, max_tokens=12, temperature=0,
                                          frequency_penalty=2.0, presence_penalty=1.0,
                                          extra_body={"repetition_penalty": 1.3})
    assert penalized.choices[0].text != plain.choices[0].text  # the random base repeats itself; penalties stop it
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        client.completions.create(model="tiny-base", prompt="x", max_tokens=2, frequency_penalty=3.0)
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="alice-a", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])


def test_openapi_health_and_offline_docs(served):
    spec = httpx.get(served["url"] + "/openapi.json", timeout=60).json()
    op = spec["paths"]["/v1/completions"]["post"]
    assert {"400", "401", "404", "413", "429", "503"} <= set(op["responses"]) and "422" not in op["responses"]
    assert any(s.get("scheme") == "bearer" for s in spec["components"]["securitySchemes"].values())
    assert op.get("security")
    assert "/v1/models/{model_id}" in spec["paths"]
    docs = httpx.get(served["url"] + "/docs", timeout=60)
    assert docs.status_code == 200 and "cdn" not in docs.text.lower()
    js = httpx.get(served["url"] + "/docs/assets/swagger-ui-bundle.js", timeout=60)
    assert js.status_code == 200 and len(js.content) > 100_000
    health = httpx.get(served["url"] + "/health", timeout=60)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    metrics = httpx.get(served["url"] + "/metrics", headers={"Authorization": f"Bearer {KEYS['alice']}"}, timeout=60)
    assert metrics.status_code == 200 and "carryon_running_rows" in metrics.text
    assert 'carryon_requests_total{model="alice-a"}' in metrics.text
    # time to first token: one record (the engine's snapshot) behind /metrics and /v1/carryon/stats
    stats = httpx.get(served["url"] + "/v1/carryon/stats", headers={"Authorization": f"Bearer {KEYS['alice']}"}, timeout=60).json()
    count = int(re.search(r"^carryon_time_to_first_token_seconds_count (\d+)$", metrics.text, re.M).group(1))
    inf = int(re.search(r'^carryon_time_to_first_token_seconds_bucket\{le="\+Inf"\} (\d+)$', metrics.text, re.M).group(1))
    assert count >= 10 and inf == count and stats["ttft_count"] >= count  # earlier tests made real requests
    assert stats["ttft_p50_s"] is not None and 0 < stats["ttft_p50_s"] < 60
    assert re.search(r"^carryon_time_to_first_token_p50_seconds \S+$", metrics.text, re.M)
    assert stats["forward"] == "flat" and stats["base_forwards"] <= stats["steps"]


COSERVE_DRIVER = """
import json, sys, types
import numpy as np, ray, ray.data
from carryon_ray.producer import Producer, Request
from carryon_ray.config import load_config
from carryon_ray.embedding import ROW_ID, ROW_INPUT_IDS, ROW_REPLAY, decode_sources, from_rows, part_layout, row_batches
from actors.client import Producers
from jobs.backend import connect_ray
tiny, adapter, n_rows, per_request, heldout = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "heldout"
cfg = load_config("configs/tiny-test.yaml", {"base.name": tiny, "base.dtype": "float32", "resources.producers": "coserve",
                                             "resources.embed_batch_size": per_request})
connect_ray(cfg)
rows = [{ROW_ID: i, ROW_REPLAY: False, ROW_INPUT_IDS: [5 + (11 * i + j) % 300 for j in range(4 + i % 9)]} for i in range(n_rows)]
for r in rows:
    r["labels"] = r[ROW_INPUT_IDS]
producers = Producers(cfg, "job-coserve-test")
calib = producers.calibrate(types.SimpleNamespace(calibration_rows=rows[:8]))
got = sorted(producers.pipeline(ray.data.from_items(rows), calib).take_all(), key=lambda r: int(r[ROW_ID]))
seen = producers.describe()
from carryon_ray.base import FrozenBase
from carryon_ray.config import BaseModelConfig
base = FrozenBase.load(BaseModelConfig(name=tiny, dtype="float32"))
mine = Producer([{}], None, bases=[base]); mine.register("j", calib)
want = mine.embed([Request("j", {k: [r[k] for r in rows] for k in rows[0]})])[0]
bridges, dims = calib.bridges(), calib.dims
layout = part_layout(bridges, dims, calib.base_dtype)
def states(cols):
    (b,) = row_batches(cols, len(cols[ROW_ID]))
    e = from_rows(b, layout)
    return decode_sources(bridges, e.enc, dims)[0][0][e.attention_mask.bool()], e.sample_ids
g_cols = {k: np.array([r[k] for r in got], dtype=object) if isinstance(got[0][k], bytes) else np.array([r[k] for r in got]) for k in got[0]}
g, g_ids = states(g_cols)
w, w_ids = states(want)
# The held-out answers of base and base + adapter, decoded on the replica beside users, against
# the same comparison on this process's own copy of the base.
on_replica = here = None
if heldout:
    from pathlib import Path
    from carryon_ray.evaluation import score_heldout
    hcfg = load_config("configs/tiny-test.yaml", {"base.name": tiny, "base.dtype": "float32", "resources.producers": "coserve",
                                                  "eval.heldout": "builtin:topics-heldout", "eval.heldout_size": 10,
                                                  "eval.max_new_tokens": 6})
    files = {p.name: p.read_bytes() for p in Path(adapter).iterdir() if p.is_file()}
    on_replica = producers.score_heldout(hcfg.model_dump(mode="json"), files)
    here = score_heldout([base], adapter, hcfg)
print("RESULT " + json.dumps({"kind": producers.kind, "ids": g_ids, "want_ids": w_ids,
                              "max_diff": float((g - w).abs().max()), "scale": float(w.abs().max()), "seen": seen,
                              "heldout": on_replica, "heldout_here": here}))
"""


def _coserving_job(served, tiny_dir: str, rows: int, per_request: int, heldout: bool) -> subprocess.Popen:
    """COSERVE_DRIVER against the served app: `rows` token rows embedded on its replica in requests of
    `per_request` rows (resources.embed_batch_size), then (heldout) the held-out comparison."""
    env = {**os.environ, **local_cluster.client_env(served["state"]), "RAY_ADDRESS": served["state"]["ray_address"],
           "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-u", "-c", COSERVE_DRIVER, tiny_dir, str(served["adapters"]["bob-b"]),
                             str(rows), str(per_request), "heldout" if heldout else "no-heldout"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)


def _result(out: str) -> dict:
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def test_a_job_embeds_through_the_model_replica_beside_users(served, tiny_dir):
    """Co-serving: a job's producers, found by its base in the running app (resources.producers:
    coserve), are the model replica itself: calibration and the rows' embedding run on its engine
    between decode steps (a user's request is served meanwhile), and the rows equal those of a
    producer of the job's own. The job's held-out answers decode on the replica too (no second
    base copy), the same as on a base of its own."""
    first = stats(served)
    before, tokens_before = first["adapter_rows"].get("held-out", 0), first["beside_tokens"]
    proc = _coserving_job(served, tiny_dir, 40, 8, heldout=True)
    r = post(served, "/v1/completions", {"model": "bob-b", "prompt": "x", "max_tokens": 8}, key="bob")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    assert r.status_code == 200
    # the job's log has none of the app's lines: no user's request, none of its own chunks' calls
    assert "ServeReplica" not in out and "/v1/completions" not in out, out[-3000:]
    res = _result(out)
    assert res["kind"] == "coserve"
    assert sorted(res["ids"]) == res["want_ids"] == list(range(40)) and len(res["ids"]) == 40
    assert res["max_diff"] <= 0.05 * res["scale"], res  # the same rows, up to float rounding of other batches
    assert res["seen"]["replica"]["beside_done"] >= 1, res["seen"]
    # the job's tokens are counted where they ran (padded per chunk, so at least the rows' own)
    assert stats(served)["beside_tokens"] - tokens_before >= sum(4 + i % 9 for i in range(40))
    held = res["heldout"]
    assert held == res["heldout_here"] and held["rows"] == 10
    assert any(r["base"] != r["adapter"] for r in held["records"])  # the adapter's rows had the adapter
    assert stats(served)["adapter_rows"].get("held-out", 0) - before == 2 * 10  # decoded on the replica


def test_a_lost_replica_answers_503_with_retry_after_and_health_follows(served, tiny_dir):
    """kill -9 of the model replica mid-request while a co-serving job's rows stream through it:
    the user's request answers 503 + Retry-After, /health reports not ready until Serve has restarted
    the replica, then requests succeed again; the job's blocks in flight are sent again to the new
    replica, so every row arrives exactly once, the same as the job's own base computes it."""
    import os
    import signal

    first = stats(served)
    pid, chunks = first["pid"], first.get("beside_done", 0)
    # 400 rows in requests of 2: ~200 calls, each a chunk between decode steps. The kill waits until
    # the replica has run some of them, so the old replica did part of the job and the new one the rest.
    job = _coserving_job(served, tiny_dir, 400, 2, heldout=False)
    deadline = time.time() + 240
    while stats(served).get("beside_done", 0) < chunks + 6:  # the calibration and >= 5 requests' chunks
        assert job.poll() is None, job.communicate()[0][-4000:]
        assert time.time() < deadline, "no job chunk ran on the replica"
        time.sleep(0.05)
    result = {}

    def call():
        # ignore_eos: the 1,024-token tiny base reaches its end token within tens of tokens (41 in a
        # clean-clone run, which ended before the kill landed on a slow machine); 900 tokens it is
        result["r"] = post(served, "/v1/completions", {"model": "alice-a", "prompt": PROMPT_A, "max_tokens": 900,
                                                       "ignore_eos": True})

    t = threading.Thread(target=call)
    t.start()
    steps = stats(served)["steps"]
    while stats(served)["steps"] < steps + 10:
        time.sleep(0.05)
    at_kill = stats(served).get("beside_done", 0) - chunks
    os.kill(pid, signal.SIGKILL)
    t.join(timeout=120)
    r = result["r"]
    assert r.status_code == 503 and int(r.headers["retry-after"]) > 0, r.text
    assert httpx.get(served["url"] + "/health", timeout=30).status_code == 503  # no replica answers yet
    deadline = time.time() + 180
    while time.time() < deadline and httpx.get(served["url"] + "/health", timeout=30).status_code != 200:
        time.sleep(1)
    assert complete(served, "alice-a", PROMPT_A, max_tokens=4)["choices"][0]["text"] == offline(served, "alice-a", PROMPT_A, 4)[0]
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 0, out[-4000:]
    res = _result(out)
    assert sorted(res["ids"]) == res["want_ids"] == list(range(400)) and len(res["ids"]) == 400  # none lost, none twice
    assert res["max_diff"] <= 0.05 * res["scale"], res
    after = stats(served)
    print(f"job chunks on the killed replica: ~{at_kill}; on the new one: {after.get('beside_done', 0)}")
    assert after["pid"] != pid and after.get("beside_done", 0) >= 1  # the new replica embedded the rest
