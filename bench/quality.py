"""A carry-on against LoRA at equal budgets (issue 19), on SmolLM2-135M-Instruct and GSM8K.

Two budgets, one run, one machine:
  (a) equal optimizer steps: 120 steps at batch 8 for LoRA and for each carry-on configuration;
  (b) equal wall time: LoRA's wall time for its 120 steps is the budget. The carry-on pipeline must
      fit everything into it: the base forward over training, validation, replay and guard data
      (once: the states are cached; the report set is measurement, outside both budgets), then a search over carry-on configurations on the cached states
      (trials run one after another here, as jobs/tune.py runs them in parallel on a cluster), the
      alpha selection, and the winner's training.

Forgetting is measured on WikiText-2 text the alpha guard never saw: the general-domain windows are
split into a guard set (the guarded alpha search reads it) and a report set (only reported).
Every carry-on runs the product's path (bench/product.py): the base forward once per example through
`embed_rows` (bridge codes), batches in the RowPlan's training order (replay rows mixed in at
--replay-per-batch per --batch), `Trainer.fit` choosing alpha after each epoch.
LoRA: r = 8 on q_proj/v_proj, lr 1e-3, the same rows in the same order (bench/replay_kl.py's run_lora). Exact match on
held-out questions (the paper's protocol) for the base, the equal-wall carry-on and LoRA.

The levers, each measured at equal steps: the shallow-layer shortcut (layers.shallow [0]: the token
embeddings averaged into the carry-on input), width and learning rate, a low-rank correction of the
inherited head scaled by alpha (head.rank), replay/KL with the guard.
Writes bench/results/quality.json. Quick sizes: --steps 12 --n-train 96 ... (make bench).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from replay_kl import ROOT, held_out_accuracy, run_lora  # bench helpers (LoRA, exact match); sets sys.path

from product import Cached, add_protocol_args, fit, protocol_data, show_progress  # noqa: E402  the product's fitting path
from carryon_ray.base import FrozenBase, resolve_base_path  # noqa: E402
from carryon_ray.config import BaseModelConfig, CarryOnConfig, validate_config  # noqa: E402
from carryon_ray.generation import CarryOnModel  # noqa: E402
from carryon_ray.train import evaluate  # noqa: E402

ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0]
TRIAL_ALPHAS = [0.0, 0.5, 1.0, 2.0]  # a search trial is ranked on the paper's {a/2, a, 2a} (a = 1) and the base

# What each carry-on configuration changes (the levers); all gated, inherited head.
CONFIGS = {
    "mlp256": {"carryon": {"kind": "mlp", "width": 256}, "lr": 3e-3, "shallow": []},
    "mlp256_shallow0": {"carryon": {"kind": "mlp", "width": 256}, "lr": 3e-3, "shallow": [0]},
    "mlp1024_lr1e-2": {"carryon": {"kind": "mlp", "width": 1024}, "lr": 1e-2, "shallow": []},
    "mlp1024_shallow0_lr1e-2": {"carryon": {"kind": "mlp", "width": 1024}, "lr": 1e-2, "shallow": [0]},
    "transformer2x128_shallow0": {"carryon": {"kind": "transformer", "width": 128, "layers": 2, "heads": 4,
                                              "kv_heads": 2}, "lr": 3e-3, "shallow": [0]},
    # The layer `carryon probe` ranks highest on GSM8K (16; docs/benchmarks.md "Layer probe"), fused by
    # a learned projection (its scale differs from the final state's), alone and with the transformer.
    "mlp256_tap16": {"carryon": {"kind": "mlp", "width": 256}, "lr": 3e-3, "shallow": [16], "fusion": "projection"},
    "transformer2x128_tap16": {"carryon": {"kind": "transformer", "width": 128, "layers": 2, "heads": 4,
                                           "kv_heads": 2}, "lr": 3e-3, "shallow": [16], "fusion": "projection"},
    # A low-rank correction of the inherited head, scaled by alpha (head.rank): logits the frozen
    # head cannot reach (W has rank <= 576 over a 49,152-token vocabulary).
    "mlp256_head8": {"carryon": {"kind": "mlp", "width": 256}, "head": {"rank": 8}, "lr": 3e-3, "shallow": []},
    "mlp256_head32": {"carryon": {"kind": "mlp", "width": 256}, "head": {"rank": 32}, "lr": 3e-3, "shallow": []},
}


def config_for(args, spec: dict, replay: bool, seed: int, alphas: list[float]) -> CarryOnConfig:
    """The product config of one carry-on configuration. Replay runs mix `replay_per_batch` general
    rows per `batch` customization rows (the RowPlan merges them in training order), so a step
    sees about as many customization rows as a run without replay."""
    ratio = args.replay_per_batch / args.batch
    return validate_config({
        "data": {"train": "bench", **({"replay": "wiki", "general_val": "wiki", "replay_ratio": ratio}
                                      if replay else {})},
        "layers": {"shallow": spec["shallow"], "fusion": spec.get("fusion", "average")},
        "carryon": {**spec["carryon"], "gate": True},
        "head": spec.get("head", {}),
        "alpha": {"init": 1.0, "rule": "list", "candidates": alphas, "max": 2.0,
                  "general_guard": 0.0 if replay else None},
        "train": {"lr": spec["lr"], "batch_size": args.batch + (args.replay_per_batch if replay else 0),
                  "warmup_steps": 10, "seed": seed, "epochs": 1, "kl_weight": args.kl_weight},
    })


def train_carryon(args, base, data, name: str, spec: dict, steps: int, replay: bool, seed: int = 0,
                  general: bool = True, alphas: list[float] = ALPHAS):
    """One carry-on configuration through the product's Trainer on the cached bridge codes; alpha
    chosen on validation data each epoch (guarded on the guard set when `replay`); the report set
    only measured. `general=False` (a search trial without replay) skips the general-domain sets:
    only validation ranks trials."""
    cfg = config_for(args, spec, replay, seed, alphas)
    keep = data.calib.subset(spec["shallow"])  # the sources this configuration reads
    train = data.training(cfg, keep)  # customization (and replay) rows in the RowPlan's order
    general = general or replay
    val, guard = data.eval("val", keep), data.eval("guard", keep) if general else None
    t0 = time.perf_counter()
    trainer, m, train_seconds = fit(cfg, keep, train, val, guard, steps, base.head_weight, base.head_bias)
    fit_seconds = time.perf_counter() - t0
    alpha = trainer.model.alpha
    report = (evaluate(trainer.model, trainer.eval_set(data.eval("report", keep)), [0.0, alpha])
              if general else None)  # measured, not chosen on
    return trainer.model, {
        "name": name, "replay": replay, "steps": trainer.step, "alpha": alpha, "val_loss": m["val_loss"],
        "gain": trainer.val_loss_base - m["val_loss"], "guard_change": m.get("general_loss_change"),
        "report_change": report[alpha] - report[0.0] if general else None,
        "trainable_params": sum(p.numel() for p in trainer.model.trainable_parameters()),
        "train_seconds": round(train_seconds, 1), "alpha_selection_seconds": round(fit_seconds - train_seconds, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_protocol_args(p, ROOT)
    p.add_argument("--guard-rows", type=int, default=50)
    p.add_argument("--report-rows", type=int, default=100)
    p.add_argument("--configs", default=",".join(CONFIGS), help="carry-on configurations at equal steps")
    p.add_argument("--out", default=str(ROOT / "bench/results/quality.json"))
    args = p.parse_args()
    show_progress()
    t_all = time.perf_counter()
    base = FrozenBase.load(BaseModelConfig(name=args.base, dtype="float32", device="cpu"))
    tok = base.tokenizer
    train, val, wiki, em_rows = protocol_data(args, tok)
    replay = wiki[: args.replay_rows]
    report_set = wiki[-args.report_rows:]  # never read by the guard
    guard = wiki[-(args.report_rows + args.guard_rows): -args.report_rows]
    sets = {"train": train, "val": val, "replay": replay, "guard": guard, "report": report_set}
    # The base forward, once per example, through the product's embedding function (bridge codes,
    # every tap of every configuration in one pass; a configuration keeps its own: Calibration.subset).
    # The report set is measurement only (LoRA's evaluation is outside its budget too): its forward
    # is timed apart and not charged to the carry-on's budget.
    configs = args.configs.split(",")
    taps = sorted({k for n in configs for k in CONFIGS[n]["shallow"]})
    data = Cached(base, config_for(args, CONFIGS[configs[0]], False, 0, ALPHAS), taps, sets)
    seconds = data.seconds
    embed_seconds = sum(v for k, v in seconds.items() if k != "report")
    res: dict = {"protocol": {k: v for k, v in vars(args).items() if k not in ("out", "template")},
                 "path": "product: embed_rows (bridge) -> from_rows -> RowPlan order -> Trainer.fit",
                 "bridge_bits": data.calib.bits, "embed_seconds": round(embed_seconds, 1),
                 "embed_seconds_per_set": {k: round(v, 1) for k, v in seconds.items()}}
    print(f"embedded {sum(len(v) for v in sets.values())} examples: " + json.dumps(res["embed_seconds_per_set"]),
          flush=True)
    # LoRA: the baseline and the time budget.
    lora_data = {"train": (None, train), "val": (None, val), "general": (None, report_set)}
    lo = run_lora(args, resolve_base_path(BaseModelConfig(name=args.base))[0], lora_data, tok, em_rows)
    lo["report_change"] = lo.pop("general_change")
    res["lora"] = lo
    budget = lo["train_seconds"]
    print("lora", json.dumps(lo), flush=True)
    # (a) equal steps: each lever.
    res["equal_steps"] = {}
    for name in configs:
        _, r = train_carryon(args, base, data, name, CONFIGS[name], args.steps, replay=False)
        r["gain_over_lora"] = round(r["gain"] / lo["gain"], 3)
        res["equal_steps"][name] = r
        print("equal steps", json.dumps(r), flush=True)
    best_name = max(res["equal_steps"], key=lambda n: res["equal_steps"][n]["gain"])
    _, r = train_carryon(args, base, data, best_name + "+replay_kl", CONFIGS[best_name], args.steps, replay=True)
    r["gain_over_lora"] = round(r["gain"] / lo["gain"], 3)
    res["equal_steps"][best_name + "+replay_kl"] = r
    print("equal steps", json.dumps(r), flush=True)
    # (b) equal wall time: embedding + a search (short trials of every configuration, on the cache)
    # + the winner trained with replay/KL for as many steps as the rest of the budget allows.
    t_search = time.perf_counter()
    spent = embed_seconds
    trials = {}
    probe_steps = max(1, args.steps // 4)
    for name in configs:
        _, r = train_carryon(args, base, data, name, CONFIGS[name], probe_steps, replay=False, seed=1, general=False,
                             alphas=TRIAL_ALPHAS)
        trials[name] = r
        spent = embed_seconds + (time.perf_counter() - t_search)
    winner = max(trials, key=lambda n: trials[n]["gain"])
    per_step = (trials[winner]["train_seconds"] / probe_steps) * 1.5  # replay rows make a step ~1.5x dearer
    steps = max(1, int((budget - spent) / per_step))
    model, final = train_carryon(args, base, data, winner + "+replay_kl", CONFIGS[winner], steps, replay=True)
    wall = embed_seconds + (time.perf_counter() - t_search)
    final["gain_over_lora"] = round(final["gain"] / lo["gain"], 3)
    final.update({"budget_seconds": round(budget, 1), "wall_seconds": round(wall, 1),
                  "split_seconds": {"base_forward": round(embed_seconds, 1),
                                    "search": round(sum(t["train_seconds"] + t["alpha_selection_seconds"]
                                                        for t in trials.values()), 1),
                                    "training": final["train_seconds"],
                                    "alpha_selection": final["alpha_selection_seconds"]},
                  "search_trials": {n: {k: t[k] for k in ("gain", "steps")} for n, t in trials.items()}})
    if em_rows:
        final["exact_match"] = held_out_accuracy(args, CarryOnModel([base], model, shallow=CONFIGS[winner]["shallow"]),
                                                 {"chosen": final["alpha"]}, em_rows)["chosen"]
        res["base_exact_match"] = held_out_accuracy(args, CarryOnModel([base]), {"base": None}, em_rows)["base"]
    res["equal_wall"] = final
    print("equal wall", json.dumps(final), flush=True)
    res["targets"] = {
        "equal_wall_gain_over_lora_at_least_1": final["gain_over_lora"] >= 1.0,
        "equal_wall_report_change_at_most_0": final["report_change"] <= 0,
        "equal_steps_best_gain_over_lora_at_least_0.9": max(r["gain_over_lora"] for r in res["equal_steps"].values()) >= 0.9,
    }
    res["wall_seconds"] = round(time.perf_counter() - t_all, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
