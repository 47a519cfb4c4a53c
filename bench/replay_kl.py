"""Quality and forgetting: carry-ons (MLP, 2-layer transformer; naive and replay/KL) vs peft LoRA.

Protocol (issue 8): SmolLM2-135M-Instruct in fp32; GSM8K train split -> the first N problems for
training and the next M for validation (the paper's Question/Answer template, loss on the answer);
WikiText-2 valid: the first lines feed replay, the last `--general-rows` windows are the general
validation set (disjoint). Every method gets the same number of optimizer steps at batch 8.

- <kind>:           carry-on of that kind (gated, inherited head; `--carryons mlp,transformer`: an MLP
                    and a 2-layer transformer of about the same trainable size), cross entropy only;
                    alpha = best GSM8K loss.
- <kind>_replay_kl: the same carry-on (kinds in `--replay-kinds`), with WikiText rows mixed in at
                    `--replay-per-batch` per `--batch` GSM8K rows (batches of their sum), whose loss
                    is KL(base || carry-on); alpha = best GSM8K loss whose general loss is within 0
                    of the base.
- lora:             peft LoRA on q_proj/v_proj, cross entropy on the GSM8K rows in the same order.

Every carry-on is reported at its chosen alpha and at its balance point (the largest alpha whose
WikiText-2 loss does not rise). Exact-match accuracy (the paper's protocol, carryon_ray.evaluation)
is scored on `--em-n` held-out questions that neither training nor validation read, for the base,
each carry-on at both alphas, and LoRA. Every carry-on runs the product's path (bench/product.py):
the base forward once per example through `embed_rows` (bridge codes, as the job's cache holds
them), batches in the RowPlan's training order, `Trainer.fit` choosing alpha. Writes
bench/results/replay_kl.json.
Run: python bench/replay_kl.py [--steps 120 --n-train 1000 ...].
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CARRYON_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from carryon_ray.base import FrozenBase, resolve_base_path  # noqa: E402
from carryon_ray.config import BaseModelConfig, CarryOnConfig, validate_config  # noqa: E402
from carryon_ray.data import collate  # noqa: E402
from carryon_ray.evaluation import exact_match, score_answers  # noqa: E402
from carryon_ray.generation import CarryOnModel  # noqa: E402
from carryon_ray.loss import IGNORE  # noqa: E402
from carryon_ray.progress import Pace  # noqa: E402
from carryon_ray.train import evaluate, gate_mean  # noqa: E402
from product import Cached, add_protocol_args, fit, ordered, protocol_data, show_progress  # noqa: E402  the product's path

ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5]


def arch(args, kind: str) -> dict:
    if kind == "recycled":  # the base's own top --depth blocks with rank --rank deltas (issue 34, item 3)
        return {"kind": "recycled", "depth": args.depth, "rank": args.rank}
    if kind == "mlp":
        return {"kind": "mlp", "width": args.width, "gate": True}
    return {"kind": "transformer", "width": args.transformer_width, "layers": 2, "heads": 4, "kv_heads": 2, "gate": True}


def summary(em: dict) -> dict:
    """An exact-match result without its per-question records (the JSON keeps the counts)."""
    return {k: v for k, v in em.items() if k != "records"}


def held_out_accuracy(args, model, alphas: dict[str, float], em_rows) -> dict:
    """Exact match of base + carry-on at each named alpha on the held-out questions."""
    if not em_rows:
        return {}
    out = {}
    for name, a in alphas.items():
        same = [v for v in out.values() if v["alpha"] == a]
        if same:  # e.g. the balance point is the chosen alpha: the same greedy answers
            out[name] = same[0]
            continue
        t0 = time.perf_counter()
        em = exact_match(model, em_rows, args.template, args.em_tokens, alpha=a, batch_size=args.em_batch)
        out[name] = {"alpha": a, **summary(em), "seconds": round(time.perf_counter() - t0, 1)}
        print(f"  exact match at {name} (alpha {a}): {em['correct']}/{em['n']}, answered {em['answered']:.2f}", flush=True)
    return out


def config_for(args, kind: str, replay: bool) -> CarryOnConfig:
    """The product config of one run. Replay runs mix `replay_per_batch` WikiText rows per `batch`
    GSM8K rows (the RowPlan merges them in training order)."""
    data_cfg = ({"train": "bench", "replay": "wikitext", "general_val": "wikitext",
                 "replay_ratio": args.replay_per_batch / args.batch} if replay else {"train": "bench"})
    # The recycled kind keeps its own alpha rule ({0.5a, a, 2a} from 1): each candidate is a forward
    # of its blocks over the validation and general sets, where a head-side kind scores all at once.
    alpha = {"init": 1.0, "general_guard": 0.0 if replay else None}
    if kind != "recycled":
        alpha.update(rule="list", candidates=ALPHAS, max=2.0)
    return validate_config({
        "data": data_cfg,
        "carryon": arch(args, kind),
        "alpha": alpha,
        "train": {"lr": args.lr, "batch_size": args.batch + (args.replay_per_batch if replay else 0),
                  "warmup_steps": 10, "seed": 0, "epochs": 1, "kl_weight": args.kl_weight},
    })


def run_carryon(args, base, data: Cached, kind: str, replay: bool, em_rows) -> dict:
    """One carry-on through the product's Trainer on the cached bridge codes (alpha chosen on GSM8K
    validation, guarded by the general set with replay); the full alpha curve measured after."""
    cfg = config_for(args, kind, replay)
    val_b, gen_b = data.eval("val"), data.eval("general")
    trainer, m, train_s = fit(cfg, data.calib, data.training(cfg), val_b, gen_b if replay else None, args.steps,
                              base.head_weight, base.head_bias)
    model, alpha = trainer.model, trainer.model.alpha
    val_d, gen_d = trainer.eval_set(val_b), trainer.eval_set(gen_b)
    # The whole curve for head-side kinds (one forward scores every alpha); the recycled kind's
    # forward runs per alpha, so it is scored at the base (0), 1 and the chosen alpha only.
    curve = ALPHAS if kind != "recycled" else sorted({0.0, 1.0, alpha})
    val = evaluate(model, val_d, curve)
    gen = evaluate(model, gen_d, curve)
    balance = max([a for a in curve if gen[a] <= gen[0.0]], default=0.0)
    model.set_alpha(alpha)
    model.eval()
    em = held_out_accuracy(args, CarryOnModel([base], model), {"chosen": alpha, "balance": balance}, em_rows) if em_rows else {}
    return {"kind": kind, "alpha": alpha, "exact_match": em, "val_loss": val[alpha], "gain": val[0.0] - val[alpha],
            "general_change": gen[alpha] - gen[0.0], "curve": {f"{a:g}": [val[a], gen[a]] for a in curve},
            "at_alpha_1": {"gain": val[0.0] - val[1.0], "general_change": gen[1.0] - gen[0.0]},
            "balance_alpha": balance, "at_balance": {"gain": val[0.0] - val[balance], "general_change": gen[balance] - gen[0.0]},
            **({"gate_mean_gsm8k": gate_mean(model, val_d), "gate_mean_general": gate_mean(model, gen_d)}
               if kind != "recycled" else {"depth": args.depth, "rank": args.rank}),
            "trainable_params": sum(p.numel() for p in model.trainable_parameters()),
            "train_seconds": round(train_s, 1), "seconds_per_step": round(train_s / max(trainer.step, 1), 3),
            "base_val_loss": val[0.0], "base_general_loss": gen[0.0]}


def hf_loss(model, examples, bs=8) -> float:
    """Mean next-token CE over target tokens, as evaluate() defines it."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(examples), bs):
            b = collate(examples[i : i + bs], 0)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            y = b["labels"][:, 1:]
            keep = y != IGNORE
            total += float(torch.nn.functional.cross_entropy(logits[keep].float(), y[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count


def hf_exact_match(args, model, tok, rows) -> dict:
    """Greedy generation with Hugging Face's generate (left padding), scored by the same rule."""
    texts, t0 = [], time.perf_counter()
    side, tok.padding_side = tok.padding_side, "left"
    try:
        for i in range(0, len(rows), args.em_batch):
            prompts = [args.template.format(question=r["question"]) for r in rows[i : i + args.em_batch]]
            b = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                out = model.generate(**b, max_new_tokens=args.em_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            texts += tok.batch_decode(out[:, b["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tok.padding_side = side
    return {**summary(score_answers(rows, texts)), "seconds": round(time.perf_counter() - t0, 1)}


def run_lora(args, base_dir: str, data, tok, em_rows) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base_val, base_gen = hf_loss(model, data["val"][1]), hf_loss(model, data["general"][1])
    seed = getattr(args, "seed", None)  # None: torch's unseeded default for LoRA's init (the recorded runs)
    if seed is not None:
        torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                                             target_modules=getattr(args, "lora_targets", ["q_proj", "v_proj"])))
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lora_lr)
    exs = ordered(data["train"][1], seed or 0)  # the carry-on's batches: the RowPlan's training order, in turn
    t0 = time.perf_counter()
    pace = Pace(args.steps, "steps")  # the first step, then every ~30 s, with the rate and an ETA (as a fit's lines)
    model.train()
    for step in range(args.steps):
        at = step * args.batch % len(exs)
        b = collate((exs[at : at + args.batch] + exs)[: args.batch], 0)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        y = b["labels"][:, 1:]
        keep = y != IGNORE
        loss = torch.nn.functional.cross_entropy(logits[keep].float(), y[keep])
        opt.zero_grad()
        loss.backward()
        opt.step()
        line = pace.due(step + 1)
        if line:
            print(f"  lora: step {line}, loss {float(loss):.4f}", flush=True)
    train_s = time.perf_counter() - t0
    model.eval()
    val, gen = hf_loss(model, data["val"][1]), hf_loss(model, data["general"][1])
    em = hf_exact_match(args, model, tok, em_rows) if em_rows else {}
    if em:
        print(f"  lora exact match: {em['correct']}/{em['n']}, answered {em['answered']:.2f}", flush=True)
    return {"exact_match": em, "val_loss": val, "gain": base_val - val, "general_change": gen - base_gen, "trainable_params": params,
            "train_seconds": round(train_s, 1), "seconds_per_step": round(train_s / args.steps, 3),
            "base_val_loss": base_val, "base_general_loss": base_gen}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_protocol_args(p, ROOT)
    p.add_argument("--general-rows", type=int, default=100)
    p.add_argument("--carryons", default="mlp,transformer", help="carry-on kinds trained without replay")
    p.add_argument("--replay-kinds", default="mlp", help="kinds also trained with replay/KL ('' for none)")
    p.add_argument("--width", type=int, default=256, help="MLP carry-on width")
    p.add_argument("--transformer-width", type=int, default=112,
                   help="d_model of the 2-layer transformer carry-on (112: about the MLP's trainable size)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--depth", type=int, default=15, help="recycled kind: the base's top blocks it adapts")
    p.add_argument("--rank", type=int, default=8, help="recycled kind: the rank of its deltas")
    p.add_argument("--skip-lora", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench/results/replay_kl.json"))
    args = p.parse_args()
    show_progress()

    t_all = time.perf_counter()
    base = FrozenBase.load(BaseModelConfig(name=args.base, dtype="float32", device="cpu"))
    tok = base.tokenizer
    train, val, wiki, em_rows = protocol_data(args, tok)
    replay, general = wiki[: args.replay_rows], wiki[-args.general_rows :]
    print(f"data: {len(train)} train, {len(val)} val GSM8K; {len(replay)} replay, {len(general)} general windows", flush=True)
    sets = {"train": train, "val": val, "replay": replay, "general": general}
    every = [k for k in args.carryons.split(",") if k] + [k for k in args.replay_kinds.split(",") if k]
    if "recycled" in every and set(every) != {"recycled"}:
        sys.exit("--carryons/--replay-kinds: the recycled kind reads another state (block L - depth's input): "
                 "run it alone (--carryons recycled --replay-kinds recycled)")
    cache_kind = "recycled" if "recycled" in every else "mlp"
    cached = Cached(base, config_for(args, cache_kind, False), [], sets)  # the base forward, once per example
    speeds = {name: sum(len(e.input_ids) for e in exs) / cached.seconds[name] for name, exs in sets.items()}
    print("embedded: " + json.dumps({k: round(v) for k, v in speeds.items()}) + " tokens/s", flush=True)
    data = {name: (None, exs) for name, exs in sets.items()}  # what the LoRA baseline reads
    results = {"protocol": {k: v for k, v in vars(args).items() if k != "out"}, "embed_tokens_per_s": speeds,
               "path": "product: embed_rows (bridge) -> from_rows -> RowPlan order -> Trainer.fit",
               "bridge_bits": cached.calib.bits}
    if em_rows:
        results["base_exact_match"] = held_out_accuracy(args, CarryOnModel([base]), {"base": None}, em_rows)["base"]
    kinds = [k for k in args.carryons.split(",") if k]
    runs = [(k, False) for k in kinds] + [(k, True) for k in args.replay_kinds.split(",") if k]
    for kind, replay_on in runs:
        name = f"{kind}_replay_kl" if replay_on else kind
        print(f"training {name}", flush=True)
        results[name] = run_carryon(args, base, cached, kind, replay_on, em_rows)
        print(json.dumps({k: v for k, v in results[name].items() if k != "curve"}), flush=True)
    if not args.skip_lora:
        print("training lora", flush=True)
        results["lora"] = run_lora(args, resolve_base_path(BaseModelConfig(name=args.base))[0], data, tok, em_rows)
        print(json.dumps(results["lora"]), flush=True)
        lo = results["lora"]
        results["targets"] = {name: {"gain_at_least_lora": r["gain"] >= lo["gain"],
                                     "general_change_at_most_0": r["general_change"] <= 0}
                              for name, r in results.items() if isinstance(r, dict) and "kind" in r}
    results["wall_seconds"] = round(time.perf_counter() - t_all, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
