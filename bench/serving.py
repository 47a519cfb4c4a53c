"""Serving cost of carry-ons on the real SmolLM2 base, in one process (no HTTP), ratios against the
bare base measured in the same run:

1. per-token decode latency and throughput: base alone vs base + MLP carry-on vs base + transformer
   carry-on (targets: overhead at most 10 % and 25 %);
2. a batch of 16 requests over 16 distinct adapters vs 16 requests on one adapter (target: at least
   0.9x the throughput);
3. adapter cold load from a directory: p50 (target: under 50 ms);
4. peft LoRA with a mixed-adapter batch on the same base, side by side (peft's mixed-batch
   inference, `adapter_names=`).

Writes bench/results/serving.json. `--size` scales prompts/tokens/repeats for GPU runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CARRYON_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from carryon_ray.adapter import save_adapter  # noqa: E402
from carryon_ray.base import FrozenBase, resolve_base_path  # noqa: E402
from carryon_ray.bridge import Bridge  # noqa: E402
from carryon_ray.config import BaseModelConfig, validate_config  # noqa: E402
from carryon_ray.generation import Adapter, generate_mixed  # noqa: E402
from carryon_ray.model import CarryOn  # noqa: E402

PROMPT = "Question: A farmer has 12 cows and buys 5 more. Then 3 cows are sold. How many cows are left?\nAnswer:"


def carryon(base, kind: str, seed: int, width: int) -> Adapter:
    cfg = validate_config({"data": {"train": "x"}, "carryon": {"kind": kind, "width": width, "layers": 2 if kind == "transformer" else 1,
                                                                "heads": 4, "kv_heads": 2, "gate": True}})
    torch.manual_seed(seed)
    m = CarryOn(cfg.carryon, cfg.head, [[base.hidden_size]], base.vocab_size, "average", base.head_weight, base.head_bias, 0.5)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return Adapter(m.eval(), [[Bridge(8)]], [], {})


def decode_rate(base, adapters, prompts, new_tokens: int, repeats: int) -> dict:
    """Median seconds per decoding step and generated tokens/s over `repeats` runs."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = generate_mixed(base, prompts, adapters, max_new_tokens=new_tokens, stop_at_eos=False)
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    n = sum(len(o) for o in out)
    return {"seconds": round(t, 4), "tokens_per_s": round(n / t, 2), "seconds_per_step": round(t / new_tokens, 5)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--size", type=int, default=1, help="multiplies tokens and repeats (GPU clusters)")
    p.add_argument("--out", default=str(ROOT / "bench/results/serving.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    base = FrozenBase.load(BaseModelConfig(name=args.base, dtype="float32"))
    ids = base.tokenizer(PROMPT)["input_ids"]
    new, reps = 24 * args.size, 3 * args.size
    res: dict = {"device": str(base.device), "threads": torch.get_num_threads(), "new_tokens": new, "repeats": reps}

    # 1. overhead per token, batch 1 and batch 16 on one adapter
    mlp, tfm = carryon(base, "mlp", 0, 64), carryon(base, "transformer", 1, 128)
    for batch in (1, 16):
        prompts = [ids] * batch
        b = decode_rate(base, [None] * batch, prompts, new, reps)
        m = decode_rate(base, [mlp] * batch, prompts, new, reps)
        t = decode_rate(base, [tfm] * batch, prompts, new, reps)
        res[f"batch{batch}"] = {"base": b, "mlp": m, "transformer": t,
                                "mlp_overhead": round(m["seconds"] / b["seconds"] - 1, 4),
                                "transformer_overhead": round(t["seconds"] / b["seconds"] - 1, 4)}
        print(json.dumps({f"batch{batch}": res[f"batch{batch}"]}), flush=True)

    # 2. 16 distinct adapters vs one adapter, 16 rows
    distinct = [carryon(base, "mlp", 100 + i, 64) for i in range(16)]
    one = decode_rate(base, [mlp] * 16, [ids] * 16, new, reps)
    many = decode_rate(base, distinct, [ids] * 16, new, reps)
    res["mixed16"] = {"one_adapter": one, "sixteen_adapters": many,
                      "throughput_ratio": round(many["tokens_per_s"] / one["tokens_per_s"], 4)}
    print(json.dumps({"mixed16": res["mixed16"]}), flush=True)

    # 3. cold load from a directory (parse JSON + safetensors, checksum, fingerprint, build)
    loads = []
    with tempfile.TemporaryDirectory() as d:
        fp = [base.fingerprint().to_dict()]
        for i, a in enumerate(distinct):
            save_adapter(Path(d) / f"a{i}", a.carryon, a.bridges, [], fp, "smollm2")
        Adapter.load(base, Path(d) / "a0")  # warm the code path once
        for i in range(16):
            t0 = time.perf_counter()
            Adapter.load(base, Path(d) / f"a{i}")
            loads.append((time.perf_counter() - t0) * 1000)
        size = sum(f.stat().st_size for f in (Path(d) / "a0").iterdir())
    res["cold_load_ms"] = {"p50": round(statistics.median(loads), 2), "max": round(max(loads), 2), "adapter_bytes": size}
    print(json.dumps({"cold_load_ms": res["cold_load_ms"]}), flush=True)

    # 4. peft LoRA, mixed batch over 4 LoRA adapters vs one, same base and tokens
    try:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(resolve_base_path(BaseModelConfig(name=args.base))[0], dtype=torch.float32)
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        lm = get_peft_model(hf, cfg, adapter_name="u0")
        for i in range(1, 4):
            lm.add_adapter(f"u{i}", cfg)
        lm.eval()
        batch = torch.tensor([ids] * 16)

        def lora_rate(names):
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                with torch.inference_mode():
                    lm.generate(input_ids=batch, attention_mask=torch.ones_like(batch), max_new_tokens=new,
                                min_new_tokens=new, do_sample=False, adapter_names=names, pad_token_id=0)
                times.append(time.perf_counter() - t0)
            return statistics.median(times)

        t_one, t_mixed = lora_rate(["u0"] * 16), lora_rate([f"u{i % 4}" for i in range(16)])
        res["lora_mixed16"] = {"one_adapter_s": round(t_one, 4), "four_adapters_s": round(t_mixed, 4),
                               "throughput_ratio": round(t_one / t_mixed, 4),
                               "vs_carryon_mixed_s": round(t_mixed / many["seconds"], 4)}
        print(json.dumps({"lora_mixed16": res["lora_mixed16"]}), flush=True)
    except Exception as exc:  # noqa: BLE001 - peft missing or API drift: report, keep the rest
        res["lora_mixed16"] = {"error": f"{type(exc).__name__}: {exc}"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
