"""The OpenAI fine-tuning API on the Serve app: files, jobs, events, checkpoints, cancel, and the
fine-tuned model answering its owner at once. A real local cluster (its own Ray head and MLflow
server, started and stopped here), the real `carryon serve`, real HTTP and the official openai
client; a tiny random-weight base so a job takes seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml

from carryon_ray.data import row_problem, topic_rows
from conftest import ROOT
from finetune.files import FileRejected, check_file
from finetune.jobs import ApiError, JobCreate, checkpoint_name, job_config, model_name, page, parse_model_name, \
    parse_request
from jobs import local_cluster

KEYS = {"alice": "ft-key-alice", "bob": "ft-key-bob", "carol": "ft-key-carol"}


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    return [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"].strip()}]}
            for r in topic_rows(n, seed)]


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


# -- without a cluster ---------------------------------------------------------------------------------
def test_an_uploaded_file_is_checked_line_by_line_naming_the_field():
    rows = chat_rows(20)
    bad = [dict(r) for r in rows]
    bad[4] = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}
    bad[11] = {"prompt": "only a prompt"}
    content = jsonl(bad[:12]) + b"{not json\n" + jsonl(bad[12:])
    with pytest.raises(FileRejected) as exc:
        check_file(content, max_rows=100, max_bad_fraction=0.1)
    assert exc.value.status == 400 and exc.value.code == "invalid_training_file"
    msg = exc.value.message
    assert "3 of 21 rows" in msg and "line 5: messages[1].role: must be one of system, user, assistant" in msg
    assert "line 12: no known fields" in msg and "line 13: not valid JSON" in msg
    ok = check_file(content, max_rows=100, max_bad_fraction=0.2)  # a few bad lines: kept, named in the record
    assert ok.rows == 21 and [ln for ln, _ in ok.bad] == [5, 12, 13] and ok.formats == {"chat": 18}
    with pytest.raises(FileRejected) as exc:
        check_file(content, max_rows=20, max_bad_fraction=1)
    assert exc.value.status == 413
    with pytest.raises(FileRejected, match="mix formats"):
        check_file(jsonl(chat_rows(3) + topic_rows(3)), 100, 0.1)
    assert row_problem({"messages": [{"role": "user", "content": "q"}]}).startswith("messages[0]: the last message")
    assert row_problem({"question": "q", "answer": 42}) is None
    assert row_problem({"prompt": "p", "completion": " "}) == "completion: is empty (nothing to learn)"


def test_a_job_request_maps_onto_the_job_yaml_schema_and_names_bad_fields():
    defaults = {"carryon": {"kind": "mlp", "width": 64}, "train": {"epochs": 3, "lr": 3e-3}}
    req = parse_request({"model": "b", "training_file": "file-1", "seed": 3, "suffix": "topics",
                         "method": {"type": "supervised", "supervised": {"hyperparameters": {
                             "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}}},
                         "carryon": {"carryon": {"width": 16}}})
    cfg = job_config(req, defaults, {"name": "tiny"}, 3, "/t.jsonl", None, "/out", "http://m", "exp", "reg", "alice")
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.seed) == (2, 4, 1.5e-3, 3)
    assert (cfg.carryon.kind, cfg.carryon.width, cfg.data.train, cfg.mlflow.owner) == ("mlp", 16, "/t.jsonl", "alice")
    legacy = parse_request({"model": "b", "training_file": "f", "hyperparameters": {"n_epochs": 5}})
    assert job_config(legacy, defaults, {"name": "tiny"}, 1, "/t", None, "/o", None, "e", "r", "u").train.epochs == 5
    for body, param in [({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
                        ({"method": {"type": "dpo"}}, "method.type"),
                        ({"suffix": "x" * 65}, "suffix"),
                        ({"integrations": [{"type": "wandb"}]}, "integrations"),
                        ({"temperature": 1}, "temperature")]:
        with pytest.raises(ApiError) as exc:
            parse_request({"model": "b", "training_file": "f", **body})
        assert exc.value.status == 400 and exc.value.param == param, (body, exc.value.message)
    for ext, param, text in [({"carryon": {"width": 0}}, "carryon", "carryon.width: bad value 0"),
                             ({"data": {"train": "/etc/passwd"}}, "carryon.data.train", "never from a path"),
                             ({"output": {"dir": "/"}}, "carryon.output", "not settable")]:
        with pytest.raises(ApiError) as exc:
            job_config(JobCreate(model="b", training_file="f", carryon=ext), defaults, {"name": "t"}, 1, "/t", None,
                       "/o", None, "e", "r", "u")
        assert exc.value.param == param and text in exc.value.message, exc.value.message
    name = model_name("tiny-base", "alice", "topics", "ftjob-abc123")
    assert name == "ft:tiny-base:alice:topics:ftjob-abc123" and parse_model_name(name) == ("ftjob-abc123", None)
    assert parse_model_name(checkpoint_name(name, 12)) == ("ftjob-abc123", 12)
    assert parse_model_name(model_name("b", "u", None, "ftjob-1")) == ("ftjob-1", None)
    assert parse_model_name("ft:a:b") is None and parse_model_name("ft:a:b:c:file-1") is None
    items = [{"id": f"x{i}"} for i in range(5)]
    assert page(items, "x1", 2) == {"object": "list", "data": items[2:4], "has_more": True, "first_id": "x2",
                                    "last_id": "x3"}


# -- on a real cluster ------------------------------------------------------------------------------------
pytestmark_slow = pytest.mark.slow


@pytest.fixture(scope="module")
def ft(tmp_path_factory, tiny_dir):
    """`carryon serve` on a 2-CPU local cluster (as `make serve` makes it), fine-tuning on."""
    tmp = tmp_path_factory.mktemp("ft")
    keys_file = tmp / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({v: k for k, v in KEYS.items()}))
    cfg = {"base": {"name": tiny_dir, "dtype": "float32"}, "base_model_id": "tiny-base",
           "registry": {"refresh_s": 0}, "auth": {"keys_file": str(keys_file), "admins": ["alice"]},
           "engine": {"max_rows": 8}, "replicas": {"num_cpus": 0.5, "max_adapters": 4},
           "finetune": {"max_active_jobs_per_user": 2, "max_file_bytes": 200_000, "max_file_rows": 500,
                        "defaults": {"carryon": {"kind": "mlp", "width": 16, "gate": True},
                                     "head": {"kind": "inherited"}, "alpha": {"init": 0.5, "rule": "scale3"},
                                     "train": {"epochs": 2, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2}}}}
    (tmp / "serve.yaml").write_text(yaml.safe_dump(cfg))
    state_dir = tmp / "cluster"
    state = local_cluster.up(str(state_dir), num_cpus=2)
    try:
        port = local_cluster.free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        res = subprocess.run([sys.executable, "-m", "carryon_cli", "serve", str(tmp / "serve.yaml"),
                              "--state-dir", str(state_dir), "--port", str(port)],
                             capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        yield {"url": f"http://127.0.0.1:{port}", "state": state, "tiny": tiny_dir}
    finally:
        assert local_cluster.down(str(state_dir))


def client(ft, user="alice"):
    from openai import OpenAI

    return OpenAI(base_url=ft["url"] + "/v1", api_key=KEYS[user], max_retries=0, timeout=120)


def api(ft, method, path, user="alice", **kw):
    return httpx.request(method, ft["url"] + path, headers={"Authorization": f"Bearer {KEYS[user]}"}, timeout=120, **kw)


def wait_job(c, job_id, statuses=("succeeded", "failed", "cancelled"), timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = c.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout}s")


def offline_chat(ft, source, messages, n):
    """What CarryOnModel gives for the adapter registered under `source`, decoded greedily."""
    from carryon_ray.adapter import resolve_adapter
    from carryon_ray.base import FrozenBase
    from carryon_ray.config import BaseModelConfig
    from carryon_ray.generation import CarryOnModel

    base = FrozenBase.load(BaseModelConfig(name=ft["tiny"], dtype="float32"))
    # The environment, restored after: mlflow.set_tracking_uri would outlive this module's server and
    # send later tests' registry calls (MlflowClient's default registry URI) to a stopped one.
    os.environ["MLFLOW_TRACKING_URI"] = ft["state"]["mlflow_url"]
    try:
        m = CarryOnModel.from_pretrained(base, resolve_adapter(source)) if source else CarryOnModel([base])
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    ids = base.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    out = m.generate([list(ids)], n)[0]
    return base.tokenizer.decode([t for t in out if t != base.tokenizer.eos_token_id], skip_special_tokens=True,
                                 clean_up_tokenization_spaces=False)


@pytest.mark.slow
def test_the_openai_client_fine_tunes_and_the_model_answers_its_owner_at_once(ft):
    from openai import NotFoundError

    c = client(ft)
    f = c.files.create(file=("topics.jsonl", jsonl(chat_rows(48))), purpose="fine-tune")
    assert (f.status, f.purpose, f.filename, f.bytes) == ("processed", "fine-tune", "topics.jsonl", len(jsonl(chat_rows(48))))
    assert c.files.retrieve(f.id).id == f.id and c.files.content(f.id).content == jsonl(chat_rows(48))
    assert f.id in [x.id for x in c.files.list()]
    t0 = time.time()
    # A second job of another kind (recycled top block, rank 4), queued beside the first: served side by side after.
    other = c.fine_tuning.jobs.create(model="tiny-base", training_file=f.id, suffix="recycled", extra_body={
        "carryon": {"carryon": {"kind": "recycled", "depth": 1, "rank": 4}, "train": {"lr": 1e-2}}})
    job = c.fine_tuning.jobs.create(model="tiny-base", training_file=f.id, suffix="topics", seed=7,
                                    metadata={"team": "search"},
                                    method={"type": "supervised", "supervised": {"hyperparameters": {
                                        "n_epochs": 3, "learning_rate_multiplier": 10}}})
    assert job.status in ("queued", "running") and job.seed == 7 and job.hyperparameters.n_epochs == 3
    assert job.fine_tuned_model is None and job.metadata == {"team": "search"}
    job = wait_job(c, job.id)
    wall = time.time() - t0
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:tiny-base:alice:topics:{job.id}"
    assert job.trained_tokens > 0 and job.finished_at >= job.created_at and job.error is None
    csv = c.files.content(job.result_files[0]).text.splitlines()  # OpenAI's results file: a line per step
    assert csv[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
    assert c.files.retrieve(job.result_files[0]).purpose == "fine-tune-results"
    print(f"create -> succeeded {wall:.1f}s")
    other = wait_job(c, other.id)
    assert other.status == "succeeded", other.error
    # Both jobs ran their base forward on the serving replica (no base copy in the job's process),
    # and its servability check left the adapter loaded there.
    for j in (job, other):
        said = [e.message for e in c.fine_tuning.jobs.list_events(j.id, limit=1000)]
        assert any("Base forward on the model replicas of Serve app" in m for m in said), said
        # no trainer service yet (the later tests start one): the epochs ran in the job's process
        assert "Training in the job's own process (no trainer service runs on this cluster)" in said, said
    stats = api(ft, "GET", "/v1/carryon/stats").json()
    assert stats["beside_done"] > 0 and stats["adapter_loads"] >= 2, stats
    # The model answers its owner on the very next request, streamed, equal to the registered adapter
    # offline, with no adapter load on the way (the replica's count does not move).
    messages = [{"role": "user", "content": "Sentence: The striker scored twice.\nTopic:"}]
    stream = c.chat.completions.create(model=job.fine_tuned_model, messages=messages, max_tokens=6, temperature=0,
                                       stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert api(ft, "GET", "/v1/carryon/stats").json()["adapter_loads"] == stats["adapter_loads"]
    record = api(ft, "GET", f"/v1/fine_tuning/jobs/{job.id}").json()
    assert text == offline_chat(ft, record["carryon"]["mlflow_run_id"] and f"models:/{job.id}/1", messages, 6)
    result = record["carryon"]["result"]
    assert text != offline_chat(ft, None, messages, 6), result  # the adapter changes the base's answer
    assert job.fine_tuned_model in [m.id for m in c.models.list()]
    # Mixed tenants: the base, the MLP job's model and the recycled job's, in flight at once, each as alone.
    names = ["tiny-base", job.fine_tuned_model, other.fine_tuned_model] * 3

    def ask(name):
        return c.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].message.content

    alone = {name: ask(name) for name in names[:3]}
    with ThreadPoolExecutor(len(names)) as pool:
        together = list(pool.map(ask, names))
    assert together == [alone[n] for n in names] and len(set(alone.values())) >= 2
    # Events: messages and per-step metrics, newest first; every step of the run is there.
    events = list(c.fine_tuning.jobs.list_events(job.id, limit=1000))
    kinds = {e.type for e in events}
    assert kinds == {"message", "metrics"}
    steps = sorted(e.data["step"] for e in events if e.type == "metrics")
    total = events[[e.type for e in events].index("metrics")].data["total_steps"]
    assert steps == list(range(1, total + 1)) and len(csv) == total + 1
    assert sum(bool(line.split(",")[3]) for line in csv[1:]) == 3  # validation loss at each epoch's end
    assert [e.created_at for e in events] == sorted((e.created_at for e in events), reverse=True)
    assert "successfully completed" in events[0].message
    assert sum("valid_loss" in (e.data or {}) for e in events if e.type == "metrics") == 3  # one per epoch
    first_page = c.fine_tuning.jobs.list_events(job.id, limit=3)
    assert [e.id for e in first_page.data] == [e.id for e in events[:3]] and first_page.has_more
    # Checkpoints: one per epoch, each servable under its own name.
    ckpts = list(c.fine_tuning.jobs.checkpoints.list(job.id))
    assert [k.step_number for k in ckpts] == [total, 2 * total // 3, total // 3]
    assert ckpts[0].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-{total}"
    early = c.chat.completions.create(model=ckpts[-1].fine_tuned_model_checkpoint, messages=messages, max_tokens=4,
                                      temperature=0)
    assert early.choices[0].message.content is not None
    # Listing and the record read the same through the list route; the metadata filter works.
    listed = c.fine_tuning.jobs.list(limit=50)
    assert job.id in [j.id for j in listed.data]
    assert [j.id for j in c.fine_tuning.jobs.list(metadata={"team": "search"})] == [job.id]
    # Everyone else: the model, the job, its events, checkpoints and the file answer 404, as missing ones do.
    b = client(ft, "bob")
    for call in (lambda: b.chat.completions.create(model=job.fine_tuned_model, messages=messages, max_tokens=2),
                 lambda: b.fine_tuning.jobs.retrieve(job.id), lambda: b.files.retrieve(f.id),
                 lambda: b.fine_tuning.jobs.list_events(job.id), lambda: b.fine_tuning.jobs.checkpoints.list(job.id),
                 lambda: b.files.content(f.id), lambda: b.files.delete(f.id)):
        with pytest.raises(NotFoundError):
            call()
    assert job.fine_tuned_model not in [m.id for m in b.models.list()]
    missing = api(ft, "POST", "/v1/chat/completions", user="bob",
                  json={"model": job.fine_tuned_model.replace(job.id, "ftjob-0000"), "messages": messages})
    theirs = api(ft, "POST", "/v1/chat/completions", user="bob", json={"model": job.fine_tuned_model, "messages": messages})
    assert missing.status_code == theirs.status_code == 404
    assert missing.json()["error"]["message"].replace("ftjob-0000", job.id) == theirs.json()["error"]["message"]
    # A finished job cannot be cancelled; a deleted file is gone for its owner too.
    bad = api(ft, "POST", f"/v1/fine_tuning/jobs/{job.id}/cancel")
    assert bad.status_code == 400 and "already succeeded" in bad.json()["error"]["message"]
    assert c.files.delete(f.id).deleted
    with pytest.raises(NotFoundError):
        c.files.retrieve(f.id)


@pytest.mark.slow
def test_bad_requests_answer_4xx_naming_the_field_and_create_nothing(ft):
    up = lambda user, content, purpose="fine-tune", name="d.jsonl": api(  # noqa: E731
        ft, "POST", "/v1/files", user=user, files={"file": (name, content)}, data={"purpose": purpose})
    before_files = {u: len(api(ft, "GET", "/v1/files", user=u).json()["data"]) for u in ("alice", "bob")}
    before_jobs = len(api(ft, "GET", "/v1/fine_tuning/jobs", user="alice").json()["data"])
    mostly_bad = jsonl(chat_rows(4)) + b"".join(b'{"messages": [{"role": "robot", "content": "x"}]}\n' for _ in range(6))
    r = up("alice", mostly_bad)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_training_file"
    assert "line 5: messages[0].role: must be one of" in r.json()["error"]["message"]
    assert up("alice", b"x" * 200_001).status_code == 413  # over finetune.max_file_bytes
    assert up("alice", jsonl(chat_rows(501))).status_code == 413  # over finetune.max_file_rows
    assert up("alice", jsonl(chat_rows(4)), purpose="batch").json()["error"]["param"] == "purpose"
    assert api(ft, "POST", "/v1/files", files={"file": ("d.jsonl", b"{}")}).json()["error"]["param"] == "purpose"
    assert httpx.post(ft["url"] + "/v1/files", files={"file": ("d.jsonl", b"{}")}, data={"purpose": "fine-tune"},
                      timeout=60).status_code == 401
    mine = up("alice", jsonl(chat_rows(40))).json()["id"]
    bobs = up("bob", jsonl(chat_rows(40))).json()["id"]
    data_only = up("alice", jsonl(chat_rows(40)), purpose="user_data").json()["id"]
    # 4 of 40 rows bad: the upload is kept (named in status_details); a job that allows fewer refuses it.
    some_bad = up("alice", jsonl(chat_rows(36)) + b"".join(b'{"text": 5}\n' for _ in range(4))).json()
    assert "4 of 40 rows will be skipped: line 37: text: must be a string" in some_bad["status_details"]
    cases = [({"model": "gpt-4o-mini"}, "model"),
             ({"training_file": bobs}, "training_file"),
             ({"training_file": "file-doesnotexist"}, "training_file"),
             ({"training_file": data_only}, "training_file"),
             ({"validation_file": bobs}, "validation_file"),
             ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": "many"}}}},
              "method.supervised.hyperparameters.n_epochs"),
             ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": -1}}}},
              "method.supervised.hyperparameters.learning_rate_multiplier"),
             ({"hyperparameters": {"batch_size": 0}}, "hyperparameters.batch_size"),
             ({"suffix": "s" * 65}, "suffix"),
             ({"suffix": "has:colon"}, "suffix"),
             ({"carryon": {"carryon": {"kind": "lora"}}}, "carryon"),
             ({"carryon": {"data": {"val": "/etc/hosts"}}}, "carryon.data.val"),
             ({"training_file": some_bad["id"], "carryon": {"data": {"max_bad_fraction": 0.05}}}, "training_file")]
    for extra, param in cases:
        r = api(ft, "POST", "/v1/fine_tuning/jobs", json={"model": "tiny-base", "training_file": mine, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)
        assert r.json()["error"]["message"].startswith(param.split(".")[0]) or param == "training_file", r.text
    assert "carryon.kind: bad value 'lora'; allowed: 'mlp', 'transformer' or 'recycled'" in api(
        ft, "POST", "/v1/fine_tuning/jobs", json={"model": "tiny-base", "training_file": mine,
                                                  "carryon": {"carryon": {"kind": "lora"}}}).json()["error"]["message"]
    assert api(ft, "POST", "/v1/fine_tuning/jobs", content=b"{oops").status_code == 400
    for path in ("/v1/fine_tuning/jobs/ftjob-nope", "/v1/fine_tuning/jobs/ftjob-nope/events", "/v1/files/file-nope"):
        assert api(ft, "GET", path).status_code == 404
    assert api(ft, "POST", "/v1/fine_tuning/jobs/ftjob-nope/cancel").status_code == 404
    assert len(api(ft, "GET", "/v1/fine_tuning/jobs", user="alice").json()["data"]) == before_jobs  # nothing created
    after = {u: len(api(ft, "GET", "/v1/files", user=u).json()["data"]) for u in ("alice", "bob")}
    assert after == {"alice": before_files["alice"] + 3, "bob": before_files["bob"] + 1}  # the 4 good uploads only
    assert api(ft, "GET", "/healthz").status_code == 200


def _ray_env(ft) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), **local_cluster.client_env(ft["state"])}


def _actor_alive(ft, job_id: str) -> bool:
    code = ("import ray, sys; ray.init(address=sys.argv[1], namespace='carryon-finetune', logging_level='ERROR');"
            "from finetune.runner import actor_name\n"
            "try:\n  ray.get_actor(actor_name(sys.argv[2])); print('alive')\nexcept ValueError:\n  print('gone')")
    out = subprocess.run([sys.executable, "-c", code, ft["state"]["ray_address"], job_id], capture_output=True,
                         text=True, cwd=ROOT, env=_ray_env(ft), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().endswith("alive")


def _trainers(ft, *args: str) -> subprocess.CompletedProcess:
    """`carryon trainers ...` against this module's cluster."""
    from test_job import _carryon

    return _carryon(ft["state"], "trainers", *args)


def _on_trainer_service(ft) -> None:
    """The cluster's trainer service, started once for the tests from here on (a fine-tuning job
    then fits there: finetune/runner.py). 0.3 CPU beside the replica, the gateway and one job."""
    res = _trainers(ft, "start", "--slots", "2", "--cpus", "0.3")
    assert res.returncode == 0 or "already runs" in res.stderr, res.stdout + res.stderr


def _service_fits(ft) -> dict:
    return json.loads(_trainers(ft, "status").stdout)


@pytest.mark.slow
def test_a_user_over_the_job_cap_gets_429_and_cancel_stops_a_job_at_a_step(ft):
    _on_trainer_service(ft)
    c = client(ft, "carol")
    # Long enough that a cancel lands mid-fit on a fast machine too: 64 rows x 50 epochs at batch 2 once
    # ended on the service before the job (writing each step to MLflow) had read its first epoch's
    # metrics, so the cancel came after the fit had succeeded (a clean-clone CI run, 2026-12-05).
    f = c.files.create(file=("t.jsonl", jsonl(chat_rows(128))), purpose="fine-tune")
    long = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": 1}}}
    first = c.fine_tuning.jobs.create(model="tiny-base", training_file=f.id, method=long)
    second = c.fine_tuning.jobs.create(model="tiny-base", training_file=f.id, method=long)
    over = api(ft, "POST", "/v1/fine_tuning/jobs", user="carol", json={"model": "tiny-base", "training_file": f.id})
    assert over.status_code == 429 and over.headers["retry-after"] == "30"
    assert "2 active fine-tuning jobs" in over.json()["error"]["message"]
    # The first runs beside serving (2 CPUs: replica 0.5 + gateway 0.1 + job 1); cancel it once it trains.
    deadline = time.time() + 240
    while not any(e.type == "metrics" for e in c.fine_tuning.jobs.list_events(first.id, limit=5)):
        assert time.time() < deadline, c.fine_tuning.jobs.retrieve(first.id)
        time.sleep(1)
    said = [e.message for e in c.fine_tuning.jobs.list_events(first.id, limit=1000)]
    assert any(m.startswith("Training on the cluster's trainer service") for m in said), said
    assert first.id in str(_service_fits(ft)["running"])  # its fit holds a slot of the service
    assert c.fine_tuning.jobs.cancel(first.id).status in ("running", "cancelled")
    done = wait_job(c, first.id, timeout=120)
    assert done.status == "cancelled" and done.fine_tuned_model is None and done.finished_at is not None, done
    steps = [e.data["step"] for e in c.fine_tuning.jobs.list_events(first.id, limit=10000) if e.type == "metrics"]
    assert 0 < max(steps) < done.hyperparameters.n_epochs * 128  # stopped mid-run, at a step
    gone_by = time.time() + 60  # its process (and all it held) goes right after the record says so
    while _actor_alive(ft, first.id):
        assert time.time() < gone_by, "the cancelled job's actor is still alive a minute after its record ended"
        time.sleep(1)
    while first.id in str(seen := _service_fits(ft)):  # and its fit on the service stopped, its slot free
        assert time.time() < gone_by, seen
        time.sleep(1)
    assert seen["finished"]["stopped"] >= 1, seen["finished"]
    # The second (queued behind the first, or running) is cancelled too; a new job is then accepted.
    c.fine_tuning.jobs.cancel(second.id)
    done2 = wait_job(c, second.id, timeout=120)
    assert done2.status == "cancelled", done2
    third = api(ft, "POST", "/v1/fine_tuning/jobs", user="carol", json={"model": "tiny-base", "training_file": f.id})
    assert third.status_code == 200, third.text
    c.fine_tuning.jobs.cancel(third.json()["id"])
    done3 = wait_job(c, third.json()["id"], timeout=120)
    assert done3.status == "cancelled", done3


def _kill_serve_replicas(ft, deployment: str) -> int:
    """ray.kill every live replica of a Serve deployment (Serve starts new ones); returns how many."""
    code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR')\n"
            "from ray.util.state import list_actors\n"
            "found = [a for a in list_actors(address=sys.argv[1], filters=[('state', '=', 'ALIVE')], limit=1000)\n"
            "         if a.class_name == 'ServeReplica:carryon:' + sys.argv[2]]\n"
            "for a in found:\n  ray.kill(ray.get_actor(a.name, namespace='serve'), no_restart=True)\n"
            "print(len(found))")
    out = subprocess.run([sys.executable, "-c", code, ft["state"]["ray_address"], deployment], capture_output=True,
                         text=True, cwd=ROOT, env=_ray_env(ft), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().splitlines()[-1])


def _until(fn, timeout=180):
    deadline = time.time() + timeout
    while True:
        try:
            return fn()
        except Exception:  # noqa: BLE001 - the service is coming back
            if time.time() > deadline:
                raise
            time.sleep(2)


@pytest.mark.slow
def test_killing_the_model_replica_and_the_gateway_mid_job_loses_nothing(ft):
    _on_trainer_service(ft)  # the job embeds on the replica that is killed and fits on the service
    c = client(ft)
    f = c.files.create(file=("t.jsonl", jsonl(chat_rows(64))), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model="tiny-base", training_file=f.id, suffix="survivor", method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 8, "batch_size": 2}}})
    deadline = time.time() + 240
    while not any(e.type == "metrics" for e in c.fine_tuning.jobs.list_events(job.id, limit=5)):
        assert time.time() < deadline
        time.sleep(1)
    before = [e.id for e in c.fine_tuning.jobs.list_events(job.id, limit=10000)]
    assert _kill_serve_replicas(ft, "ModelServer") == 1
    assert _kill_serve_replicas(ft, "Gateway") == 1
    done = _until(lambda: wait_job(client(ft), job.id, timeout=300))
    assert done.status == "succeeded", done.error
    events = list(c.fine_tuning.jobs.list_events(job.id, limit=10000))
    assert set(before) <= {e.id for e in events}  # every event from before the kills is still there
    metrics = [e.data for e in events if e.type == "metrics"]
    total = metrics[0]["total_steps"]
    assert sorted(m["step"] for m in metrics) == list(range(1, total + 1))  # every step
    assert any(e.message.startswith("Training on the cluster's trainer service") for e in events)
    ckpts = list(c.fine_tuning.jobs.checkpoints.list(job.id))  # each epoch's state from the service, servable
    assert sorted(k.step_number for k in ckpts) == [total * e // 8 for e in range(1, 9)]  # 8 epochs
    reply = _until(lambda: c.chat.completions.create(model=done.fine_tuned_model, max_tokens=3, temperature=0,
                                                     messages=[{"role": "user", "content": "Topic:"}]))
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert c.files.retrieve(f.id).id == f.id  # the file too
