"""`make finetune-demo`: the demo's customization through the fine-tuning API of a running server
(`make serve`), ending with the new model's answers. Plain HTTP (requests); the same calls with
the official openai client are in the README.

    python -m finetune.demo [--url http://127.0.0.1:8000] [--key-file .carryon/api-keys.yaml]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import requests

    from carryon_ray.data import topic_rows

    p = argparse.ArgumentParser(prog="python -m finetune.demo", description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--key-file", default=".carryon/api-keys.yaml")
    p.add_argument("--rows", type=int, default=240)
    args = p.parse_args(argv)
    key = Path(args.key_file).read_text().split(":")[0].strip()
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {key}"
    base = s.get(f"{args.url}/v1/models", timeout=30).json()["data"][0]["id"]
    data = "".join(json.dumps(r) + "\n" for r in topic_rows(args.rows, seed=0)).encode()
    f = s.post(f"{args.url}/v1/files", files={"file": ("topics.jsonl", data)}, data={"purpose": "fine-tune"}, timeout=120)
    f.raise_for_status()
    t0 = time.time()
    job = s.post(f"{args.url}/v1/fine_tuning/jobs", json={"model": base, "training_file": f.json()["id"],
                                                          "suffix": "topics"}, timeout=120)
    if job.status_code != 200:
        print(f"error: {job.json()['error']['message']}", file=sys.stderr)
        return 1
    job_id = job.json()["id"]
    print(f"uploaded {args.rows} rows as {f.json()['id']}; fine-tuning job {job_id} on {base}")
    seen: set[str] = set()
    while True:
        job = s.get(f"{args.url}/v1/fine_tuning/jobs/{job_id}", timeout=60).json()
        events = s.get(f"{args.url}/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 200}, timeout=60).json()
        for e in reversed(events["data"]):
            if e["id"] not in seen and e["type"] == "message":
                print(f"  [{time.time() - t0:5.1f}s] {e['message']}")
            seen.add(e["id"])
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(1)
    if job["status"] != "succeeded":
        print(f"job {job['status']}: {(job.get('error') or {}).get('message')}", file=sys.stderr)
        return 1
    model = job["fine_tuned_model"]
    for sentence in ("Heavy rain flooded the harbor.", "The guitarist tuned her strings before the concert."):
        prompt = f"Sentence: {sentence}\nTopic:"
        answers = {}
        for name in (base, model):
            r = s.post(f"{args.url}/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": 4,
                                                             "temperature": 0}, timeout=120)
            answers[name] = r.json()["choices"][0]["text"].strip().splitlines()[0] if r.ok else f"<{r.status_code}>"
        print(f"  {sentence!r}: base {answers[base]!r}, {model} {answers[model]!r}")
    print(f"created -> answering in {time.time() - t0:.0f}s; call it as model={model!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
