"""Quality and forgetting: carry-ons (MLP, 2-layer transformer; naive and replay/KL) vs peft LoRA.

Protocol (issue 8): SmolLM2-135M-Instruct in fp32; GSM8K train split -> the first N problems for
training and the next M for validation (the paper's Question/Answer template, loss on the answer);
WikiText-2 valid: the first lines feed replay, the last `--general-rows` windows are the general
validation set (disjoint). Every method gets the same number of optimizer steps at batch 8.

- <kind>:           carry-on of that kind (gated, inherited head; `--carryons mlp,transformer`: an MLP
                    and a 2-layer transformer of about the same trainable size), cross entropy only;
                    alpha = best GSM8K loss.
- <kind>_replay_kl: the same carry-on (kinds in `--replay-kinds`), each batch also holds
                    `--replay-per-batch` WikiText rows whose loss is KL(base || carry-on); alpha = best
                    GSM8K loss whose general loss is within 0 of the base.
- lora:             peft LoRA on q_proj/v_proj, cross entropy on the same batches.

Every carry-on is reported at its chosen alpha and at its balance point (the largest alpha whose
WikiText-2 loss does not rise). Exact-match accuracy (the paper's protocol, carryon_ray.evaluation)
is scored on `--em-n` held-out questions that neither training nor validation read, for the base,
each carry-on at both alphas, and LoRA. Base states are computed once and reused by every carry-on
(as the job's cache does). Writes bench/results/replay_kl.json.
Run: python bench/replay_kl.py [--steps 120 --n-train 1000 ...].
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CARRYON_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from carryon_ray.base import FrozenBase, resolve_base_path  # noqa: E402
from carryon_ray.config import BaseModelConfig, DataConfig, validate_config  # noqa: E402
from carryon_ray.data import DataReport, collate, load_examples, read_rows  # noqa: E402
from carryon_ray.evaluation import exact_match, score_answers  # noqa: E402
from carryon_ray.generation import CarryOnModel  # noqa: E402
from carryon_ray.loss import IGNORE  # noqa: E402
from carryon_ray.train import AlphaSearch, build_carryon, evaluate, gate_mean, make_optimizer, train_step  # noqa: E402

ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5]


def embed(base: FrozenBase, examples, batch: int = 16):
    """Deep states per example (trimmed to its length), and tokens/s of the base forward."""
    out, tokens, t0 = [], 0, time.perf_counter()
    pad = base.tokenizer.pad_token_id
    for i in range(0, len(examples), batch):
        b = collate(examples[i : i + batch], pad)
        with torch.inference_mode():
            states, _ = base.hidden_states(b["input_ids"], b["attention_mask"], [])
        for j, e in enumerate(examples[i : i + batch]):
            out.append(states[0][j, : len(e.input_ids)].clone())
        tokens += int(b["attention_mask"].sum())
    return out, tokens / (time.perf_counter() - t0)


def pad_batch(states, examples, idx):
    T = max(len(examples[i].input_ids) for i in idx)
    D = states[idx[0]].shape[-1]
    x = torch.zeros(len(idx), T, D)
    y = torch.full((len(idx), T), IGNORE, dtype=torch.long)
    for r, i in enumerate(idx):
        n = len(examples[i].input_ids)
        x[r, :n] = states[i]
        y[r, :n] = torch.tensor(examples[i].labels)
    return x, y


def eval_batches(states, examples, bs=16):
    return [([[x]], y) for x, y in (pad_batch(states, examples, list(range(i, min(i + bs, len(examples)))))
                                    for i in range(0, len(examples), bs))]


def arch(args, kind: str) -> dict:
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


def run_carryon(args, base, data, kind: str, replay: bool, em_rows) -> dict:
    data_cfg = {"train": "bench", "replay": "wikitext", "general_val": "wikitext"} if replay else {"train": "bench"}
    cfg = validate_config({
        "data": data_cfg,
        "carryon": arch(args, kind),
        "alpha": {"init": 1.0, "rule": "list", "candidates": ALPHAS[1:], "max": 2.0,
                  "general_guard": 0.0 if replay else None},
        "train": {"lr": args.lr, "batch_size": args.batch, "warmup_steps": 10, "seed": 0},
    })
    model = build_carryon(cfg, [base.hidden_size], base.vocab_size, base.head_weight, base.head_bias)
    opt, sched = make_optimizer(model, cfg, args.steps)
    rng = random.Random(0)
    t0 = time.perf_counter()
    for step in range(args.steps):
        idx = rng.sample(range(len(data["train"][1])), args.batch)
        x, y = pad_batch(*data["train"], idx)
        mask = None
        if replay:
            ridx = rng.sample(range(len(data["replay"][1])), args.replay_per_batch)
            xr, yr = pad_batch(*data["replay"], ridx)
            T = max(x.shape[1], xr.shape[1])
            x = torch.cat([torch.nn.functional.pad(x, (0, 0, 0, T - x.shape[1])),
                           torch.nn.functional.pad(xr, (0, 0, 0, T - xr.shape[1]))])
            y = torch.cat([torch.nn.functional.pad(y, (0, T - y.shape[1]), value=IGNORE),
                           torch.nn.functional.pad(yr, (0, T - yr.shape[1]), value=IGNORE)])
            mask = torch.tensor([False] * args.batch + [True] * args.replay_per_batch)
        out = train_step(model, opt, sched, [[x]], y, 1024, 1.0, mask, args.kl_weight)
        if step % 20 == 0:
            print(f"  step {step}: loss {out['loss']:.4f} (ce {out['ce']:.4f}, kl {out['kl']:.4f})", flush=True)
    train_s = time.perf_counter() - t0
    val = evaluate(model, data["val_b"], ALPHAS)
    gen = evaluate(model, data["general_b"], ALPHAS)
    search = AlphaSearch.from_config(cfg)
    alpha = search.choose(val, gen, gen[0.0]) if replay else min(val, key=val.get)
    balance = max([a for a in ALPHAS if gen[a] <= gen[0.0]], default=0.0)
    model.set_alpha(alpha)
    model.eval()
    em = held_out_accuracy(args, CarryOnModel([base], model), {"chosen": alpha, "balance": balance}, em_rows)
    return {"kind": kind, "alpha": alpha, "exact_match": em, "val_loss": val[alpha], "gain": val[0.0] - val[alpha],
            "general_change": gen[alpha] - gen[0.0], "curve": {f"{a:g}": [val[a], gen[a]] for a in ALPHAS},
            "at_alpha_1": {"gain": val[0.0] - val[1.0], "general_change": gen[1.0] - gen[0.0]},
            "balance_alpha": balance, "at_balance": {"gain": val[0.0] - val[balance], "general_change": gen[balance] - gen[0.0]},
            "gate_mean_gsm8k": gate_mean(model, data["val_b"]), "gate_mean_general": gate_mean(model, data["general_b"]),
            "trainable_params": sum(p.numel() for p in model.trainable_parameters()),
            "train_seconds": round(train_s, 1), "seconds_per_step": round(train_s / args.steps, 3),
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
    model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                                             target_modules=getattr(args, "lora_targets", ["q_proj", "v_proj"])))
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lora_lr)
    rng = random.Random(0)
    exs = data["train"][1]
    t0 = time.perf_counter()
    model.train()
    for step in range(args.steps):
        b = collate([exs[i] for i in rng.sample(range(len(exs)), args.batch)], 0)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        y = b["labels"][:, 1:]
        keep = y != IGNORE
        loss = torch.nn.functional.cross_entropy(logits[keep].float(), y[keep])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:
            print(f"  lora step {step}: loss {float(loss):.4f}", flush=True)
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
    p.add_argument("--gsm8k", default=str(ROOT.parent / "shared/data/gsm8k/train.jsonl"))
    p.add_argument("--wikitext", default=str(ROOT.parent / "shared/data/wikitext2/valid.txt"))
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--general-rows", type=int, default=100)
    p.add_argument("--replay-rows", type=int, default=500)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--replay-per-batch", type=int, default=4)
    p.add_argument("--carryons", default="mlp,transformer", help="carry-on kinds trained without replay")
    p.add_argument("--replay-kinds", default="mlp", help="kinds also trained with replay/KL ('' for none)")
    p.add_argument("--width", type=int, default=256, help="MLP carry-on width")
    p.add_argument("--transformer-width", type=int, default=112,
                   help="d_model of the 2-layer transformer carry-on (112: about the MLP's trainable size)")
    p.add_argument("--em-n", type=int, default=48, help="held-out questions for exact match (0: skip)")
    p.add_argument("--em-tokens", type=int, default=192, help="new tokens per exact-match answer")
    p.add_argument("--em-batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--kl-weight", type=float, default=1.0)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--skip-lora", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench/results/replay_kl.json"))
    args = p.parse_args()

    t_all = time.perf_counter()
    base = FrozenBase.load(BaseModelConfig(name=args.base, dtype="float32", device="cpu"))
    tok = base.tokenizer
    qa = DataConfig(train=args.gsm8k, format="qa", max_length=256)
    read = 2 * (args.n_train + args.n_val)  # some rows run long
    gsm, rep = load_examples(args.gsm8k, tok, qa, limit=read)
    print(f"GSM8K: {rep.summary()}", flush=True)
    args.template = qa.prompt_template
    # Held-out questions: the rows after every row training and validation could have read.
    em_rows = read_rows(args.gsm8k, DataReport(args.gsm8k), limit=read + args.em_n)[read:] if args.em_n else []
    if args.em_n and len(em_rows) < args.em_n:
        sys.exit(f"--em-n {args.em_n}: only {len(em_rows)} rows of {args.gsm8k} are left after the first {read}")
    train, val = gsm[: args.n_train], gsm[args.n_train : args.n_train + args.n_val]
    text = DataConfig(train=args.wikitext, format="text", loss_on_prompt=True, max_length=128)
    wiki, _ = load_examples(args.wikitext, tok, text)
    wiki = [e for e in wiki if len(e.input_ids) >= 32]  # headings and blank-ish lines carry little
    replay, general = wiki[: args.replay_rows], wiki[-args.general_rows :]
    print(f"data: {len(train)} train, {len(val)} val GSM8K; {len(replay)} replay, {len(general)} general windows", flush=True)
    data, speeds = {}, {}
    for name, exs in [("train", train), ("val", val), ("replay", replay), ("general", general)]:
        states, speeds[name] = embed(base, exs)
        data[name] = (states, exs)
        print(f"embedded {name}: {speeds[name]:.0f} tokens/s", flush=True)
    data["val_b"] = eval_batches(*data["val"])
    data["general_b"] = eval_batches(*data["general"])
    results = {"protocol": {k: v for k, v in vars(args).items() if k != "out"}, "embed_tokens_per_s": speeds}
    if em_rows:
        results["base_exact_match"] = held_out_accuracy(args, CarryOnModel([base]), {"base": None}, em_rows)["base"]
    kinds = [k for k in args.carryons.split(",") if k]
    runs = [(k, False) for k in kinds] + [(k, True) for k in args.replay_kinds.split(",") if k]
    for kind, replay_on in runs:
        name = f"{kind}_replay_kl" if replay_on else kind
        print(f"training {name}", flush=True)
        results[name] = run_carryon(args, base, data, kind, replay_on, em_rows)
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
