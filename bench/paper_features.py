"""Convergence of the paper's variants on SmolLM2 (issue 6): the recycled-top carry-on vs a random
transformer, and two bases vs one (paper figure 3).

Every run is the in-process backend (`fit_in_process`: base forward once, then the carry-on
epochs on cached states) on the same GSM8K rows (the paper's Question/Answer template, loss on
the answer), with the same steps, batch and learning-rate schedule; the validation loss at the
chosen alpha is recorded after every epoch.

- transformer_random: a 2-block transformer carry-on shaped like SmolLM2's blocks (width 576,
                      9 heads, 3 KV heads, SwiGLU 1536), random initialisation, all weights train.
- recycled_top2:      carryon.kind: recycled, SmolLM2's own top 2 blocks (frozen) with rank-8 deltas,
                      reading the cached state entering block 28 (bench/quality.py compares depths).
- mlp_one_base:       the paper's tiny MLP carry-on (width 64) on SmolLM2 alone.
- mlp_two_bases:      the same carry-on fed SmolLM2 plus a second base with the same tokenizer,
                      fused by learned projection (default: SmolLM2 in bf16; --second random gives
                      a random-weight sibling with SmolLM2's shape).

Writes bench/results/paper_features.json. Run: python bench/paper_features.py [--rows 240 ...].
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CARRYON_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from carryon_ray.base import resolve_base_path  # noqa: E402
from carryon_ray.config import BaseModelConfig, validate_config  # noqa: E402
from carryon_ray.pipeline import fit_in_process  # noqa: E402

SMOL = "smollm2-135m-instruct"


def random_sibling(out: Path) -> str:
    """SmolLM2's architecture and tokenizer with random weights (same tokenizer, other 'knowledge')."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path, _ = resolve_base_path(BaseModelConfig(name=SMOL))
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return str(out)


def run(name: str, args, carryon: dict, extra_bases=(), fusion="average", lr=None) -> dict:
    cfg = validate_config({
        "base": {"name": SMOL, "dtype": "float32"},
        "extra_bases": list(extra_bases),
        "layers": {"shallow": [], "fusion": fusion},
        "carryon": carryon,
        "alpha": {"init": 0.5, "rule": "list", "candidates": [0.25, 0.5, 1.0, 1.5], "max": 2.0},
        "train": {"epochs": args.epochs, "batch_size": 8, "lr": lr or args.lr, "warmup_steps": 5},
        "data": {"train": args.data, "format": "qa", "num_samples": args.rows, "val_fraction": 0.2,
                 "max_length": 256},
        "bridge": {"bits": 8},
        "output": {"dir": tempfile.mkdtemp(prefix=f"bench-{name}-")},
    })
    t0 = time.perf_counter()
    r = fit_in_process(cfg)
    wall = time.perf_counter() - t0
    from carryon_ray.train import build_carryon  # parameter count of the trained configuration

    trainable = sum(p.numel() for p in build_carryon(cfg, [576] * (1 + len(extra_bases)), 49152,
                                                     torch.zeros(49152, 576)).trainable_parameters())
    out = {"val_loss_base": r["val_loss_before"], "val_loss_per_epoch": [h["val_loss"] for h in r["history"]],
           "alpha_per_epoch": [h["alpha"] for h in r["history"]], "trainable_params": trainable,
           "train_tokens_per_s": r["last_epoch"]["train_tokens_per_s"], "wall_s": wall}
    print(name, json.dumps(out), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/gsm8k/train.jsonl"))
    p.add_argument("--rows", type=int, default=240, help="GSM8K rows read (80%% train, 20%% validation)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--second", choices=["bf16", "random"], default="bf16", help="the second base for mixing")
    p.add_argument("--only", default=None, help="comma-separated subset of runs")
    p.add_argument("--out", default=str(ROOT / "bench/results/paper_features.json"))
    args = p.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    shape = {"kind": "transformer", "width": 576, "heads": 9, "kv_heads": 3, "mlp_hidden": 1536, "layers": 2,
             "rope_theta": 100000.0, "norm_eps": 1e-5}
    with tempfile.TemporaryDirectory() as tmp:
        second = {"name": SMOL, "dtype": "bfloat16"} if args.second == "bf16" else {
            "name": random_sibling(Path(tmp) / "sibling"), "dtype": "float32"}
        runs = {
            "transformer_random": lambda: run("transformer_random", args, shape),
            "recycled_top2": lambda: run("recycled_top2", args, {"kind": "recycled", "depth": 2, "rank": 8}),
            "mlp_one_base": lambda: run("mlp_one_base", args, {"kind": "mlp", "width": 64}, (), "projection"),
            "mlp_two_bases": lambda: run("mlp_two_bases", args, {"kind": "mlp", "width": 64}, [second], "projection"),
        }
        chosen = args.only.split(",") if args.only else list(runs)
        results = {name: runs[name]() for name in chosen}
    report = {"config": vars(args), "runs": results}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
