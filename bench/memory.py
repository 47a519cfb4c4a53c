"""Training memory vs base size: the carry-on's training side vs peft LoRA (issue 5, item 3).

For bases of growing size (SmolLM2-135M, and random-weight Llama configs of about 360M and 1.5B
parameters with SmolLM2's vocabulary), each measurement runs in a fresh subprocess and reports its
peak resident memory (ru_maxrss) and seconds per step:

- carryon: what a Train worker holds: the base's output head (V x D, inherited) and the gated MLP
  carry-on (width 64), fed bridge-decoded states of shape [batch, tokens, D]; AdamW steps. The
  decoder stack is never loaded (the producers hold it).
- lora:    the whole base in memory, peft LoRA on q_proj/v_proj with the rank chosen so its
  trainable parameter count is closest to the carry-on's; forward + backward + AdamW on the same
  token batch.
- idle:    python + torch imported, nothing else: the floor under both.

With --recycled-depths (SmolLM2-135M only: the recycled kind reads the base's own top blocks from its
checkpoint), also the recycled-top carry-on's trainer (the top k blocks frozen, deltas of --recycled-rank (8) on all
seven linears, the final norm and the inherited head; cached states [batch, tokens, D] in) against
LoRA r = 8 on q, v and on all linear layers, at the same batch.

Target (issue): carry-on training memory flat in base size and at most 0.1x LoRA's. Writes
bench/results/memory.json. Run: python bench/memory.py [--sizes 135m,360m,1.5b --batch 2 --tokens 128].
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 49152
SIZES = {  # hidden, layers, heads, kv heads, intermediate
    "135m": (576, 30, 9, 3, 1536),
    "360m": (960, 32, 15, 5, 2560),
    "1.5b": (2048, 24, 32, 8, 8192),
}

CHILD = r'''
import json, os, resource, sys, time
sys.path.insert(0, {root!r})
os.environ.setdefault("CARRYON_CACHE", {cache!r}); os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
torch.manual_seed(0)
kind, size, batch, tokens, steps = {kind!r}, {size!r}, {batch}, {tokens}, {steps}
D, L, H, KV, I = {shape}
V = {vocab}
def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out = {{"kind": kind, "size": size}}
if kind == "carryon" or kind.startswith("recycled"):
    # What a Train worker holds: the inherited head (the only base tensor it loads) and the carry-on
    # (the gated MLP of width 64, or the recycled kind's top `depth` blocks of SmolLM2 with deltas).
    from carryon_ray.config import validate_config
    from carryon_ray.train import build_carryon, make_optimizer, train_step
    arch = {{"kind": "mlp", "width": 64}} if kind == "carryon" else {{"kind": "recycled", "depth": int(kind[8:]), "rank": {rank}}}
    cfg = validate_config({{"base": {{"name": "smollm2-135m-instruct", "dtype": "float32"}}, "data": {{"train": "x"}},
                           "carryon": arch}})
    head = torch.randn(V, D) * 0.02
    model = build_carryon(cfg, [D], V, head)
    opt, sched = make_optimizer(model, cfg, steps)
    x = torch.randn(batch, tokens, D)
    y = torch.randint(0, V, (batch, tokens))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter(); train_step(model, opt, sched, [[x]], y, 1024, 1.0); times.append(time.perf_counter() - t0)
    out["trainable"] = model.num_params(trainable_only=True)
elif kind in ("lora", "lora_all"):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    if size == "135m":
        from carryon_ray.base import FrozenBase
        from carryon_ray.config import BaseModelConfig
        model = FrozenBase.load(BaseModelConfig(name="smollm2-135m-instruct", dtype="float32")).model
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                                             num_key_value_heads=KV, intermediate_size=I, tie_word_embeddings=True))
    model.requires_grad_(False)
    targets = ["q_proj", "v_proj"] if kind == "lora" else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r={rank}, lora_alpha=2 * {rank}, target_modules=targets))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, V, (batch, tokens))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(); loss.backward(); opt.step()
        times.append(time.perf_counter() - t0)
    out["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out["base_params"] = sum(p.numel() for p in model.parameters())
else:
    times = [0.0]
out["peak_rss_mb"] = rss_mb()
out["step_s"] = min(times)
print("RESULT " + json.dumps(out))
'''


def measure(kind: str, size: str, args, rank: int = 8) -> dict:
    code = CHILD.format(root=str(ROOT), cache=os.environ.get("CARRYON_CACHE", str(ROOT / ".cache")), kind=kind,
                        size=size, batch=args.batch, tokens=args.tokens, steps=args.steps, shape=SIZES[size],
                        vocab=VOCAB, rank=rank)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    if res.returncode or not line:
        raise RuntimeError(f"{kind} {size} failed: {res.stderr[-2000:]}")
    out = json.loads(line[-1][7:])
    print(json.dumps(out), flush=True)
    return out


def lora_rank_for(trainable: int, size: str) -> int:
    D, L, H, KV, _ = SIZES[size]
    per_rank = L * ((D + D) + (D + D // H * KV))  # q: D -> D, v: D -> kv_dim, each r x (in + out)
    return max(1, round(trainable / per_rank))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="135m,360m,1.5b")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--recycled-depths", default="", help="e.g. 8,15: the recycled-top trainer vs LoRA (q,v and all) at 135m")
    p.add_argument("--recycled-batch", type=int, default=8)
    p.add_argument("--recycled-tokens", type=int, default=192)
    p.add_argument("--recycled-rank", type=int, default=8, help="the recycled deltas' rank (the shipped default: 32)")
    p.add_argument("--out", default=str(ROOT / "bench/results/memory.json"))
    args = p.parse_args()
    idle = measure("idle", "135m", args)
    recycled = []
    if args.recycled_depths:
        sub = argparse.Namespace(**{**vars(args), "batch": args.recycled_batch, "tokens": args.recycled_tokens})
        lora = {k: measure(k, "135m", sub, 8) for k in ("lora", "lora_all")}
        for depth in args.recycled_depths.split(","):
            r = measure(f"recycled{int(depth)}", "135m", sub, args.recycled_rank)
            recycled.append({"depth": int(depth), "rank": args.recycled_rank, "recycled": r, **{f"{k}_rss_mb": v["peak_rss_mb"] for k, v in lora.items()},
                             "over_lora_qv_rss": r["peak_rss_mb"] / lora["lora"]["peak_rss_mb"],
                             "over_lora_all_rss": r["peak_rss_mb"] / lora["lora_all"]["peak_rss_mb"],
                             "over_lora_all_above_idle": (r["peak_rss_mb"] - idle["peak_rss_mb"])
                             / (lora["lora_all"]["peak_rss_mb"] - idle["peak_rss_mb"]),
                             "step_over_lora_all": r["step_s"] / lora["lora_all"]["step_s"]})
        if args.sizes == "none":
            report = {"config": vars(args), "idle_rss_mb": idle["peak_rss_mb"], "recycled": recycled,
                      "lora": lora, "target_recycled_over_lora": 0.5}
            Path(args.out).write_text(json.dumps(report, indent=2))
            print(f"wrote {args.out}")
            return
    rows = []
    for size in args.sizes.split(","):
        c = measure("carryon", size, args)
        rank = lora_rank_for(c["trainable"], size)
        lo = measure("lora", size, args, rank)
        rows.append({"size": size, "hidden": SIZES[size][0], "base_params": lo["base_params"], "lora_rank": rank,
                     "carryon": c, "lora": lo,
                     "carryon_over_lora_rss": c["peak_rss_mb"] / lo["peak_rss_mb"],
                     "carryon_over_lora_above_idle": (c["peak_rss_mb"] - idle["peak_rss_mb"])
                     / (lo["peak_rss_mb"] - idle["peak_rss_mb"]),
                     "lora_over_carryon_step_time": lo["step_s"] / c["step_s"]})
    report = {"config": vars(args), "idle_rss_mb": idle["peak_rss_mb"], "rows": rows, "target": 0.1,
              **({"recycled": recycled} if recycled else {})}
    Path(args.out).write_text(json.dumps(report, indent=2))
    for r in rows:
        print(f"{r['size']:>5}: carry-on {r['carryon']['peak_rss_mb']:.0f} MB, LoRA r={r['lora_rank']} "
              f"{r['lora']['peak_rss_mb']:.0f} MB -> {r['carryon_over_lora_rss']:.3f}x "
              f"({r['carryon_over_lora_above_idle']:.3f}x above idle)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
