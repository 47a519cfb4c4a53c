"""The recycled-top carry-on against LoRA (issue 22), on SmolLM2-135M-Instruct and GSM8K, through the product.

Every carry-on run here is the product's own path (bench/product.py): token rows -> `embed_rows` (the
embedding actors' function; the state entering block L - k, bridge at --bridge-bits, 0 unless set) ->
`from_rows` -> batches in the RowPlan's training order -> `Trainer.fit` (alpha chosen on validation
data after each epoch by the config's rule). Each depth k has its own cache, filled by one base forward
stopped at its tap (as a job for that depth fills it); configurations of the same depth share it.

Baselines, on the same examples in the same order (bench/replay_kl.py's `run_lora`): LoRA r = 8 on
q, v (the project's baseline so far) and LoRA r = 8 on all seven linear layers of every block (the
stronger baseline), lr --lora-lr.

Equal steps: every configuration gets --steps optimizer steps at --batch. Equal wall: a configuration's
wall is its cache fill (train + validation forwards, stopped at its tap) plus its whole fit (the base's
validation loss, training, and each epoch's alpha choice); it is compared with LoRA's training time
for the same steps.

The bridge on an intermediate state: the base's own validation loss (alpha = 0) computed from the
8-bit and 4-bit round-tripped state entering block L - k, against the exact state.

--bridge-bits 0,8 trains each configuration on exact states and on 8-bit codes (issue 34, item 5: the
bridge default of this kind by measured loss against bytes per token).

--select-rows 0,16 runs each configuration with the alpha candidates scored on every validation row and
on a strided subset of about 16 (alpha.select_rows; the chosen alpha's loss is still the whole set's);
--recycled-steps gives the recycled runs a step count of their own (issue 34, item 2: equal wall).

Writes bench/results/recycled.json. Quick sizes: --n-train 48 --n-val 16 --steps 4 --depths 2 (make bench).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from replay_kl import ROOT, run_lora  # bench helpers (LoRA); sets sys.path

from product import Cached, fit, show_progress  # noqa: E402  the product's fitting path
from carryon_ray.base import FrozenBase, resolve_base_path  # noqa: E402
from carryon_ray.bridge import Bridge  # noqa: E402
from carryon_ray.config import BaseModelConfig, BridgeConfig, CarryOnConfig, DataConfig, validate_config  # noqa: E402
from carryon_ray.data import load_examples  # noqa: E402
from carryon_ray.embedding import token_rows  # noqa: E402
from carryon_ray.train import evaluate  # noqa: E402

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def config_for(args, depth: int, rank: int, lr: float, bits: int = 0, select_rows: int = 0) -> CarryOnConfig:
    """The product config of one recycled configuration (everything else at the kind's defaults)."""
    return validate_config({"base": {"name": args.base_dir, "dtype": "float32"}, "data": {"train": "bench"},
                            "carryon": {"kind": "recycled", "depth": depth, "rank": rank}, "bridge": {"bits": bits},
                            "alpha": {"select_rows": select_rows},
                            "train": {"lr": lr, "batch_size": args.batch, "warmup_steps": 10, "epochs": 1,
                                      "seed": args.seed or 0}})


def run_recycled(args, base, data: Cached, depth: int, rank: int, lr: float, bits: int = 0,
                 exact_val: dict | None = None, select_rows: int = 0) -> dict:
    """One recycled configuration fitted by `Trainer.fit` on its depth's cache (states sent at `bits`).
    `exact_val` ({depth: decoded exact validation states}) is filled by a 0-bit run and read by a
    lossy one: serving runs the blocks on the exact state, so that run's adapter is scored there too."""
    cfg = config_for(args, depth, rank, lr, bits, select_rows)
    t0 = time.perf_counter()
    trainer, m, train_s = fit(cfg, data.calib, data.training(cfg), data.eval("val"), None,
                              args.recycled_steps or args.steps, base.head_weight, base.head_bias)
    fit_s = time.perf_counter() - t0
    served = {}
    if exact_val is not None and bits == 0:
        exact_val.setdefault(depth, trainer.eval_set(data.eval("val")))
    elif exact_val is not None and depth in exact_val:  # the adapter as served: exact states in
        got = evaluate(trainer.model, exact_val[depth], [0.0, m["alpha"]])  # alpha 0: the base itself
        served = {"val_loss_base_exact_states": got[0.0], "val_loss_exact_states": got[m["alpha"]],
                  "gain_exact_states": got[0.0] - got[m["alpha"]]}
    trainable = sum(p.numel() for p in trainer.model.trainable_parameters())
    frozen = sum(p.numel() for p in trainer.model._blocks[0].parameters())
    return {"depth": depth, "rank": rank, "lr": lr, "bridge_bits": bits, "select_rows": select_rows,
            "alphas_per_epoch": [h["alpha"] for h in trainer.history], "tap": data.calib.tap, "trainable_params": trainable,
            "frozen_block_params": frozen, "val_loss_base": trainer.val_loss_base, "val_loss": m["val_loss"],
            "alpha": m["alpha"], "gain": trainer.val_loss_base - m["val_loss"], "steps": trainer.step,
            "train_seconds": round(train_s, 1), "seconds_per_step": round(train_s / max(trainer.step, 1), 3),
            "fit_seconds": round(fit_s, 1), "eval_seconds": round(fit_s - train_s, 1),
            "candidates": {f"{a:g}": v for a, v in trainer.history[-1]["candidates"].items()}, **served}


def bridge_cost(base, val_ex, taps, args) -> dict:
    """The base's validation loss (alpha = 0) from the state entering block L - k sent through the
    bridge at 0 (exact), 8 and 4 bits (per-token scale, fitted on the first batch's real tokens)."""
    from carryon_ray.embedding import collate_rows, decode_sources
    from carryon_ray.train import build_carryon

    out = {}
    for tap in taps:
        depth = base.num_layers - tap
        cfg = validate_config({"base": {"name": args.base_dir, "dtype": "float32"}, "data": {"train": "bench"},
                               "carryon": {"kind": "recycled", "depth": depth, "rank": 8}})
        model = build_carryon(cfg, [base.hidden_size], base.vocab_size, base.head_weight)
        states = []
        for i in range(0, len(val_ex), 16):
            padded = collate_rows(token_rows(val_ex[i : i + 16]), base.tokenizer.pad_token_id)
            (h,), _ = base.hidden_states(padded["input_ids"], padded["attention_mask"], tap=tap)
            states.append((h, padded["attention_mask"], padded["labels"]))
        calib = states[0][0][states[0][1].bool()]
        res = {}
        for bits in (0, 8, 4):
            br = Bridge.from_config(BridgeConfig(bits=bits), calib)
            batches = [(decode_sources([[br]], {f"s0_0_{k}": v for k, v in br.encode(h).items()}, [[base.hidden_size]]),
                        y) for h, _, y in states]
            res[f"bits_{bits}"] = evaluate(model, batches, [0.0])[0.0]
        out[str(depth)] = {**res, "loss_change_8bit": res["bits_8"] - res["bits_0"],
                           "loss_change_4bit": res["bits_4"] - res["bits_0"]}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gsm8k", default=str(ROOT.parent / "shared/data/gsm8k/train.jsonl"))
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--depths", default="2,4,8,15")
    p.add_argument("--ranks", default="8", help="ranks tried at every depth")
    p.add_argument("--lrs", default="3e-3", help="learning rates tried at every depth")
    p.add_argument("--extra", default="8:32:3e-3", help="more depth:rank:lr runs (comma-separated)")
    p.add_argument("--lora", default="qv,all", help="LoRA baselines: qv (q_proj, v_proj), all (all linear layers)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--bridge-depths", default="8", help="depths whose intermediate state is bridged at 8/4 bits")
    p.add_argument("--bridge-bits", default="0",
                   help="bridge bits every configuration TRAINS through (comma-separated; 0 = exact fp32 states): "
                        "each (depth, bits) fills its own cache")
    p.add_argument("--recycled-steps", type=int, default=0,
                   help="optimizer steps of the recycled runs (0 = --steps): an equal-wall budget taken from an "
                        "equal-step run's step time and fixed costs")
    p.add_argument("--select-rows", default="0",
                   help="alpha.select_rows values every configuration runs with (comma-separated; 0 = every "
                        "validation row scores every candidate)")
    p.add_argument("--seed", type=int, default=None,
                   help="the run's seed: the training order (RowPlan), the carry-on's init (train.seed) and LoRA's "
                        "init (torch.manual_seed); unset: seed 0 for the first two and torch's unseeded default "
                        "for LoRA (the recorded runs)")
    p.add_argument("--out", default=str(ROOT / "bench/results/recycled.json"))
    args = p.parse_args()
    show_progress()
    t_all = time.perf_counter()
    args.base_dir = resolve_base_path(BaseModelConfig(name=args.base))[0]
    base = FrozenBase.load(BaseModelConfig(name=args.base_dir, dtype="float32", device="cpu"))
    tok = base.tokenizer
    qa = DataConfig(train=args.gsm8k, format="qa", max_length=256)
    gsm, _ = load_examples(args.gsm8k, tok, qa, limit=2 * (args.n_train + args.n_val))
    train, val = gsm[: args.n_train], gsm[args.n_train : args.n_train + args.n_val]
    L = base.num_layers
    depths = [int(d) for d in args.depths.split(",") if d]
    runs = [(d, int(r), float(lr)) for d in depths for r in args.ranks.split(",") for lr in args.lrs.split(",")]
    runs += [(int(d), int(r), float(lr)) for d, r, lr in (x.split(":") for x in args.extra.split(",") if x)]
    bridge_depths = [int(d) for d in args.bridge_depths.split(",") if d]
    res: dict = {"protocol": {k: v for k, v in vars(args).items() if k != "out"},
                 "path": "product: embed_rows (state entering block L - k) -> from_rows -> RowPlan order -> "
                         "Trainer.fit"}
    # LoRA baselines on the same examples in the same order.
    res["lora"] = {}
    lora_data = {"train": (None, train), "val": (None, val), "general": (None, val[:8])}
    for name in [x for x in args.lora.split(",") if x]:
        args.lora_targets = ["q_proj", "v_proj"] if name == "qv" else ALL_LINEAR
        lo = run_lora(args, args.base_dir, lora_data, tok, [])
        lo.pop("general_change", None)
        res["lora"][name] = lo
        print("lora", name, json.dumps(lo), flush=True)
        write(res, args.out)  # each result on disk as it comes: a long grid cut short keeps what ran
    better = max(res["lora"].values(), key=lambda r: r["gain"]) if res["lora"] else None
    qv, lora_all = res["lora"].get("qv"), res["lora"].get("all")
    res["recycled"], res["cache_fill_seconds"] = [], {}
    bits_list = sorted(int(b) for b in args.bridge_bits.split(",") if b)  # 0 first: its exact states score the rest
    exact_val: dict = {}
    for depth, bits in [(d, b) for d in sorted({d for d, _, _ in runs}) for b in bits_list]:
        # This depth's cache at these bits: one forward over the training and validation rows, stopped
        # at its tap, sent through the bridge (every rank and lr of the depth trains on it).
        same = [(rank, lr) for d, rank, lr in runs if d == depth]
        data = Cached(base, config_for(args, depth, *same[0], bits), [], {"train": train, "val": val})
        fill = sum(data.seconds.values())
        key = str(depth) if bits_list == [0] else f"{depth}@{bits}bit"
        res["cache_fill_seconds"][key] = round(fill, 1)
        print(f"depth {depth}, {bits}-bit bridge: cache filled in {fill:.0f}s (tap {data.calib.tap})", flush=True)
        for rank, lr, select in [(rank, lr, int(x)) for rank, lr in same for x in args.select_rows.split(",") if x]:
            r = run_recycled(args, base, data, depth, rank, lr, bits, exact_val if len(bits_list) > 1 else None, select)
            r["cache_fill_seconds"] = round(fill, 1)
            r["wall_seconds"] = round(fill + r["fit_seconds"], 1)
            if qv:
                r["gain_over_lora_qv"] = round(r["gain"] / qv["gain"], 3)
                r["step_over_lora_qv"] = round(r["seconds_per_step"] / qv["seconds_per_step"], 3)
            if better:
                r["gain_over_better_lora"] = round(r["gain"] / better["gain"], 3)
                r["wall_over_lora_train"] = round(r["wall_seconds"] / better["train_seconds"], 3)
            if lora_all:  # the strongest baseline, named as issue 34 asks
                r["gain_over_lora_all"] = round(r["gain"] / lora_all["gain"], 3)
                r["wall_over_lora_all"] = round(r["wall_seconds"] / lora_all["train_seconds"], 3)
            res["recycled"].append(r)
            print("recycled", json.dumps(r), flush=True)
            write(res, args.out)
        del data
    res["bridge"] = bridge_cost(base, val[:48], [L - d for d in bridge_depths], args)
    print("bridge", json.dumps(res["bridge"]), flush=True)
    res["wall_seconds"] = round(time.perf_counter() - t_all, 1)
    write(res, args.out)
    print(f"wrote {args.out}")
    return 0


def write(res: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    sys.exit(main())
