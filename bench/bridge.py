"""Bridge: bytes per token and validation loss for bits 0/8/4/2 and a PCA projection after equal
training (issue 5, item 5; the paper's figure 5).

The base forward runs once: SmolLM2's deep states (fp32) for every training and validation row
are kept, then each bridge setting is calibrated on the same calibration batch, round-trips the
states (encode -> the bytes that would cross the network -> decode), and the same MLP carry-on
(width 64, same seed, same batches, same steps) is trained on what comes out. Reported per
setting: bytes per token on the wire, the ratio to bf16 (2 bytes x D), and validation loss at the
chosen alpha, next to the base's own loss.

Writes bench/results/bridge.json. Run: python bench/bridge.py [--rows 240 --epochs 2].
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CARRYON_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from carryon_ray.base import FrozenBase  # noqa: E402
from carryon_ray.bridge import fit_bridges  # noqa: E402
from carryon_ray.config import BridgeConfig, validate_config  # noqa: E402
from carryon_ray.data import batches, load_splits  # noqa: E402
from carryon_ray.train import AlphaSearch, build_carryon, evaluate, make_optimizer, train_step  # noqa: E402

SETTINGS = [{"bits": 0}, {"bits": 8}, {"bits": 4}, {"bits": 2}, {"bits": 8, "projection_dim": 128}]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/gsm8k/train.jsonl"))
    p.add_argument("--rows", type=int, default=240)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench/results/bridge.json"))
    args = p.parse_args()
    cfg = validate_config({
        "base": {"name": "smollm2-135m-instruct", "dtype": "float32"},
        "carryon": {"kind": "mlp", "width": 64},
        "alpha": {"init": 0.5, "rule": "list", "candidates": [0.25, 0.5, 1.0, 1.5], "max": 2.0},
        "train": {"epochs": args.epochs, "batch_size": 8, "warmup_steps": 5},
        "data": {"train": args.data, "format": "qa" if args.data.endswith(".jsonl") else "auto",
                 "num_samples": args.rows, "val_fraction": 0.2, "max_length": 256},
    })
    base = FrozenBase.load(cfg.base)
    splits = load_splits(base.tokenizer, cfg.data, seed=0)
    pad = base.tokenizer.pad_token_id

    def states(examples):
        out = []
        for b in batches(examples, 8, pad):
            with torch.inference_mode():
                s, _ = base.hidden_states(b["input_ids"], b["attention_mask"], [])
            out.append((s[0].clone(), b["labels"], b["attention_mask"].bool()))
        return out

    train, val = states(splits.train), states(splits.val)
    calib = torch.cat([x[m] for x, _, m in train[:4]])[:4096]
    D = base.hidden_size
    rows = []
    for setting in SETTINGS:
        bcfg = BridgeConfig(**setting)
        bridge = fit_bridges(bcfg, [[calib]])[0][0]

        def roundtrip(data):
            return [([[bridge.decode(bridge.encode(x), dtype=torch.float32, dim=D)]], y) for x, y, _ in data]

        tr, va = roundtrip(train), roundtrip(val)
        model = build_carryon(cfg, [D], base.vocab_size, base.head_weight, base.head_bias)
        steps = args.epochs * len(tr)
        opt, sched = make_optimizer(model, cfg, steps)
        search = AlphaSearch.from_config(cfg)
        base_loss = evaluate(model, [(s, y) for s, y in roundtrip(val)], [0.0])[0.0]
        exact_base = evaluate(model, [([[x]], y) for x, y, _ in val], [0.0])[0.0]
        g = torch.Generator().manual_seed(0)
        for epoch in range(args.epochs):
            for i in torch.randperm(len(tr), generator=g).tolist():
                train_step(model, opt, sched, tr[i][0], tr[i][1], 1024, 1.0)
            losses = evaluate(model, va, search.candidates())
            model.set_alpha(search.choose(losses))
        bpt = bridge.bytes_per_token(D, torch.bfloat16)
        row = {**setting, "bytes_per_token": bpt, "vs_bf16": bpt / (2 * D), "val_loss": losses[search.current],
               "alpha": search.current, "base_val_loss_exact": exact_base, "base_val_loss_through_bridge": base_loss}
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps({"config": vars(args), "hidden": D, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
