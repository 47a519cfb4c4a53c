"""The Serve app on a real local cluster (its own Ray head and MLflow server, started and stopped
here), deployed with the real `carryon serve` CLI and exercised over real HTTP and with the official
openai client."""

from __future__ import annotations

import hashlib
import json
import os
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
    broken = tmp / "alice-broken"
    shutil.copytree(ads["alice-a"], broken)
    weights = broken / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64] + b"\0" * 64)  # tampered tail: checksum mismatch
    keys_file = tmp / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({KEYS["alice"]: "alice", KEYS["carol"]: "carol",
                                         "sha256:" + hashlib.sha256(KEYS["bob"].encode()).hexdigest(): "bob"}))
    cfg = {"base": {"name": tiny_dir, "dtype": "float32"}, "base_model_id": "tiny-base",
           "adapters": [{"name": "alice-a", "source": str(ads["alice-a"]), "owner": "alice"},
                        {"name": "bob-b", "source": str(ads["bob-b"]), "owner": "bob"},
                        {"name": "shared-s", "source": str(ads["shared-s"]), "shared": True},
                        {"name": "alice-broken", "source": str(broken), "owner": "alice"}],
           "registry": {"refresh_s": 0},
           "auth": {"keys_file": str(keys_file), "admins": ["alice"]},
           "limits": {"max_tokens": 32, "max_prompt_chars": 2000, "alpha_max": 2.0, "max_body_bytes": 20000},
           "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.15},
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


def test_two_users_share_a_batch_and_get_their_own_outputs(served):
    before = httpx.get(served["url"] + "/v1/carryon/stats", headers={"Authorization": f"Bearer {KEYS['alice']}"}).json()
    results = {}

    def call(name, model, key, prompt):
        results[name] = complete(served, model, prompt, key=key, max_tokens=10)["choices"][0]["text"]

    jobs = [("a", "alice-a", "alice", PROMPT_A), ("b", "bob-b", "bob", PROMPT_A),
            ("s", "shared-s", "carol", PROMPT_B), ("base", "tiny-base", "carol", PROMPT_B)]
    threads = [threading.Thread(target=call, args=j) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = httpx.get(served["url"] + "/v1/carryon/stats", headers={"Authorization": f"Bearer {KEYS['alice']}"}).json()
    assert after["rows"] - before["rows"] == 4
    assert after["batches"] - before["batches"] < 4  # at least two users were decoded together
    assert after["max_batch"] >= 2
    assert results["a"] == offline(served, "alice-a", PROMPT_A, 10)[0]
    assert results["b"] == offline(served, "bob-b", PROMPT_A, 10)[0]
    assert results["s"] == offline(served, "shared-s", PROMPT_B, 10)[0]
    assert results["base"] == offline(served, None, PROMPT_B, 10)[0]
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
                   headers={"Authorization": "Bearer not-a-key"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(served["url"] + "/v1/carryon/stats", headers={"Authorization": f"Bearer {KEYS['bob']}"}).status_code == 403

    def models(key):
        r = httpx.get(served["url"] + "/v1/models", headers={"Authorization": f"Bearer {KEYS[key]}"})
        assert r.status_code == 200
        return {m["id"] for m in r.json()["data"]}

    assert models("alice") == {"tiny-base", "alice-a", "alice-broken", "shared-s", "reg-alice"}
    assert models("bob") == {"tiny-base", "bob-b", "shared-s"}
    assert models("carol") == {"tiny-base", "shared-s"}
    spec = httpx.get(served["url"] + "/openapi.json").json()  # FastAPI's generated document
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
    ("max_tokens over limit", {"model": "alice-a", "prompt": "x", "max_tokens": 33}, 400, "limit of 32"),
    ("negative temperature", {"model": "alice-a", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ("alpha over max", {"model": "alice-a", "prompt": "x", "carryon_alpha": 2.5}, 400, "carryon_alpha"),
    ("n > 1", {"model": "alice-a", "prompt": "x", "n": 2}, 400, "n:"),
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
