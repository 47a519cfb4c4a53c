"""GPU figures: the inference-class and training-class paths of carryon-ray on a real accelerator.

One script, no Ray and no MLflow (the core imports without them), random-weight Llama models of
real shapes built from a config (nothing downloaded): SmolLM2-1.7B's and Llama-3-8B's. On `cuda`
in bf16 it measures and writes JSON:

  1. producer: tokens/s of the embedding producer (`embed_batch`: backbone + 8-bit bridge, no
     vocabulary projection) vs a plain Hugging Face forward with logits vs the backbone alone,
     batch 8 and 32 x 512 tokens;
  2. training step: the core's `train_step` on producer states (inherited head, chunked loss) vs a
     peft LoRA r=8 q,v step on the same model and batch: step time and peak CUDA memory above what
     was resident before the step;
  3. decoding: 64 rows over 1, 8 and 64 distinct carry-ons vs the base alone (tokens/s, through the
     decode engine), and the decode overhead of one MLP and one 2-layer transformer carry-on;
  4. the invariant in bf16 on the device: alpha = 0 equals the base's logits bit for bit.

`--smoke` runs it on CPU with tiny shapes (part of the test suite). The full run is sized to finish
in under 8 minutes on one H100. On a GPU box without pydantic, carry its wheels (`make gpu-wheels`).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from carryon_ray.base import FrozenBase  # noqa: E402
from carryon_ray.bridge import Bridge  # noqa: E402
from carryon_ray.config import validate_config  # noqa: E402
from carryon_ray.embedding import decode_sources, embed_batch  # noqa: E402
from carryon_ray.generation import Adapter, CarryOnModel, generate_mixed  # noqa: E402
from carryon_ray.train import build_carryon, make_optimizer, train_step  # noqa: E402

# Real shapes (public configs), random weights.
SHAPES = {
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=True, rope_theta=130000.0,
                         max_position_embeddings=8192),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
                      max_position_embeddings=8192),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=1024),
}


class SyntheticTokenizer:
    """What the core asks of a tokenizer, for a model with no tokenizer files: special ids and a
    vocabulary to fingerprint."""

    def __init__(self, vocab: int):
        self.vocab = vocab
        self.eos_token_id = self.pad_token_id = vocab - 1
        self.bos_token_id = 0
        self.eos_token, self.bos_token, self.chat_template = "</s>", "<s>", None

    def get_vocab(self) -> dict:
        return {f"t{i}": i for i in range(self.vocab)}

    def __len__(self) -> int:
        return self.vocab


def make_base(shape: str, device: str, dtype: torch.dtype) -> FrozenBase:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**SHAPES[shape], bos_token_id=0, eos_token_id=SHAPES[shape]["vocab_size"] - 1)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: seconds for 8B instead of minutes on CPU
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return FrozenBase(model, SyntheticTokenizer(cfg.vocab_size), name=shape)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, reps: int, warmup: int = 1) -> float:
    """Median seconds of `fn` over `reps` runs after `warmup`."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def batch(base: FrozenBase, b: int, t: int, device: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, base.vocab_size - 1, (b, t), generator=g).to(device)
    return ids, torch.ones_like(ids)


def carryon_cfg(kind: str, width: int):
    return validate_config({"data": {"train": "x"}, "carryon": {"kind": kind, "width": width, "layers": 2,
                                                                 "heads": 8 if width >= 64 else 4, "kv_heads": 2,
                                                                 "gate": True},
                            "train": {"dtype": "float32", "loss_chunk": 1024}})


def adapter(base: FrozenBase, kind: str, width: int, seed: int) -> Adapter:
    cfg = carryon_cfg(kind, width)
    m = build_carryon(cfg, [base.hidden_size], base.vocab_size, base.head_weight, base.head_bias)
    torch.manual_seed(seed)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.02)
    m.set_alpha(0.5)
    return Adapter(m.to(base.device).eval(), [[Bridge(8)]], [], {})


# ---------------------------------------------------------------------------------------------


def producer(base: FrozenBase, device: str, batches: list[int], seq: int, reps: int) -> dict:
    bridges = [[Bridge(8)]]
    out = {}
    for b in batches:
        ids, mask = batch(base, b, seq, device)
        tokens = b * seq
        with torch.inference_mode():
            plain = timed(lambda: base.model(input_ids=ids, attention_mask=mask), device, reps)
            backbone = timed(lambda: base.model.model(input_ids=ids, attention_mask=mask), device, reps)
            prod = timed(lambda: embed_batch([base], bridges, ids, mask, []), device, reps)
        out[f"batch{b}x{seq}"] = {"hf_forward_with_logits_tok_s": round(tokens / plain, 1),
                                  "backbone_only_tok_s": round(tokens / backbone, 1),
                                  "producer_tok_s": round(tokens / prod, 1),
                                  "producer_over_hf_forward": round(plain / prod, 3)}
    return out


def train_steps(base: FrozenBase, device: str, b: int, seq: int, reps: int, lora: bool) -> dict:
    ids, mask = batch(base, b, seq, device)
    labels = ids.clone()
    res: dict = {}
    # The carry-on: the producer's 8-bit codes, decoded, through the core's train_step.
    bridges = [[Bridge(8)]]
    with torch.inference_mode():
        enc = embed_batch([base], bridges, ids, mask, [])
    enc = {k: v.to(device) for k, v in enc.items()}
    cfg = carryon_cfg("mlp", 64)
    model = build_carryon(cfg, [base.hidden_size], base.vocab_size, base.head_weight, base.head_bias).to(device)
    opt, sched = make_optimizer(model, cfg, 100)

    def carry_step():
        sources = decode_sources(bridges, enc, [[base.hidden_size]], base.dtype, device)
        train_step(model, opt, sched, sources, labels, cfg.train.loss_chunk, 1.0)

    res["carryon"] = measure_step(carry_step, device, reps)
    res["carryon"]["trainable_params"] = sum(p.numel() for p in model.trainable_parameters())
    res["carryon"]["head_bytes"] = base.head_weight.numel() * base.head_weight.element_size()
    del model, opt, sched
    if lora:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            res["lora"] = {"skipped": "peft is not installed"}
            return res
        lm = get_peft_model(base.model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        lm.train()
        lopt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-4)

        def lora_step():
            out = lm(input_ids=ids, attention_mask=mask, labels=labels)
            lopt.zero_grad(set_to_none=True)
            out.loss.backward()
            lopt.step()

        res["lora"] = measure_step(lora_step, device, reps)
        res["lora"]["trainable_params"] = sum(p.numel() for p in lm.parameters() if p.requires_grad)
        lm.unload()  # the base back as it was
        base.model.eval().requires_grad_(False)
        res["lora_over_carryon_step_time"] = round(res["lora"]["step_s"] / res["carryon"]["step_s"], 2)
        res["lora_over_carryon_peak_extra"] = round(res["lora"]["peak_extra_mb"] / max(res["carryon"]["peak_extra_mb"], 1e-9), 2)
    return res


def measure_step(step, device: str, reps: int) -> dict:
    step()  # warm-up (optimizer state allocated)
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
    t = timed(step, device, reps, warmup=0)
    out = {"step_s": round(t, 4)}
    if device.startswith("cuda"):
        out["peak_extra_mb"] = round((torch.cuda.max_memory_allocated() - resident) / 2**20, 1)
        out["resident_mb"] = round(resident / 2**20, 1)
    else:
        out["peak_extra_mb"] = 0.0
    return out


def decoding(base: FrozenBase, device: str, rows: int, prompt: int, new: int, reps: int) -> dict:
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, base.vocab_size - 1, (prompt,), generator=g).tolist() for _ in range(rows)]

    def rate(adapters) -> float:
        t = timed(lambda: generate_mixed(base, prompts, adapters, max_new_tokens=new, stop_at_eos=False), device, reps)
        return rows * new / t

    res = {"rows": rows, "prompt_tokens": prompt, "new_tokens": new}
    res["base_tok_s"] = round(rate([None] * rows), 1)
    mlp = adapter(base, "mlp", 64, 0)
    tfm = adapter(base, "transformer", 128, 1)
    res["mlp_tok_s"] = round(rate([mlp] * rows), 1)
    res["transformer_tok_s"] = round(rate([tfm] * rows), 1)
    res["mlp_overhead"] = round(res["base_tok_s"] / res["mlp_tok_s"] - 1, 4)
    res["transformer_overhead"] = round(res["base_tok_s"] / res["transformer_tok_s"] - 1, 4)
    for distinct in (8, rows):
        pool = [adapter(base, "mlp", 64, 10 + i) for i in range(distinct)]
        res[f"distinct{distinct}_tok_s"] = round(rate([pool[i % distinct] for i in range(rows)]), 1)
        res[f"distinct{distinct}_over_one"] = round(res[f"distinct{distinct}_tok_s"] / res["mlp_tok_s"], 3)
    return res


def engine_load(base: FrozenBase, device: str, rows: int, prompt: int, long_prompt: int, budget: int) -> dict:
    """The serving engine's step on this device: `rows` rows decode while a `long_prompt`-token prompt
    arrives, fed `budget` tokens per step. Per forward mode (flat: one forward per step, the engine's
    layer loop; padded: a decode forward plus a prefill forward), seconds per step before the arrival
    and during its prefill (the decoding rows' inter-token latency), and the flat loop's logits
    against the padded ones."""
    from carryon_ray.engine import Engine, Request

    g = torch.Generator().manual_seed(4)
    ids = [torch.randint(1, base.vocab_size - 1, (prompt,), generator=g).tolist() for _ in range(rows)]
    long = torch.randint(1, base.vocab_size - 1, (long_prompt,), generator=g).tolist()
    res: dict = {"rows": rows, "long_prompt": long_prompt, "prefill_tokens": budget}
    for forward in ("padded", "flat"):
        engine = Engine(base, max_rows=rows + 1, prefill_tokens=budget, forward=forward)
        for p in ids:  # they decode for as long as the measurement runs
            engine.submit(Request(p, None, engine.max_len - prompt - 1, stop_at_eos=False))
        while engine.decoding < rows:
            if not any(engine.step().tokens) and not engine.rows:
                raise RuntimeError("the decoding rows were not admitted")

        def steps(n: int) -> list[float]:
            out = []
            for _ in range(n):
                sync(device)
                t0 = time.perf_counter()
                engine.step()
                sync(device)
                out.append(time.perf_counter() - t0)
            return out

        steps(2)
        before = sorted(steps(8))[4]
        seq = engine.submit(Request(long, None, 1, stop_at_eos=False))
        during = []
        while not seq.done:
            during += steps(1)
        res[forward] = {"step_s": round(before, 5), "decode_tok_s": round(rows / before, 1),
                        "step_during_prefill_s": round(sum(during) / len(during), 5),
                        "itl_ratio": round(sum(during) / len(during) / before, 3), "forwards": engine.stats.forwards,
                        "steps": engine.stats.steps}
    res["flat_over_padded_decode"] = round(res["padded"]["step_s"] / res["flat"]["step_s"], 3)
    return res


def invariant(base: FrozenBase, device: str) -> dict:
    ids, mask = batch(base, 2, 64, device)
    mask[1, :10] = 0  # left padding in the second row
    model = CarryOnModel([base])
    model.adapter = adapter(base, "transformer", 128, 3)
    ref = base.logits(ids, mask)
    out = model.logits(ids, mask, alpha=0.0)
    active = model.logits(ids, mask, alpha=1.0)
    return {"dtype": str(out.dtype), "alpha0_bit_exact": bool(torch.equal(out, ref)),
            "alpha1_differs": not bool(torch.equal(active, ref))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (the test suite runs this)")
    p.add_argument("--device", default="auto")
    p.add_argument("--shapes", default="smollm2-1.7b,llama3-8b")
    p.add_argument("--out", default=str(ROOT / "bench/results/gpu_check.json"))
    args = p.parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    shapes = ["tiny"] if args.smoke else args.shapes.split(",")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    seq, batches, reps = (32, [2], 1) if args.smoke else (512, [8, 32], 5)
    report: dict = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
                    "dtype": str(dtype), "smoke": args.smoke}
    if device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name()
    t_all = time.perf_counter()
    for shape in shapes:
        t0 = time.perf_counter()
        base = make_base(shape, device, dtype)
        r: dict = {"params_b": round(sum(p.numel() for p in base.model.parameters()) / 1e9, 3)}
        r["invariant"] = invariant(base, device)
        print(shape, "invariant", r["invariant"], flush=True)
        r["producer"] = producer(base, device, batches, seq, reps)
        print(shape, "producer", r["producer"], flush=True)
        r["train"] = train_steps(base, device, 2 if args.smoke else 8, seq, 1 if args.smoke else 3, lora=True)
        print(shape, "train", r["train"], flush=True)
        r["decode"] = decoding(base, device, 4 if args.smoke else 64, 16 if args.smoke else 128,
                               4 if args.smoke else 64, 1 if args.smoke else 2)
        print(shape, "decode", r["decode"], flush=True)
        r["engine"] = engine_load(base, device, 4 if args.smoke else 16, 8 if args.smoke else 64,
                                  24 if args.smoke else 1000, 8 if args.smoke else 256)
        print(shape, "engine", r["engine"], flush=True)
        r["seconds"] = round(time.perf_counter() - t0, 1)
        report[shape] = r
        del base
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    report["seconds"] = round(time.perf_counter() - t_all, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out} in {report['seconds']}s")
    return 0 if all(report[s]["invariant"]["alpha0_bit_exact"] for s in shapes) else 1


if __name__ == "__main__":
    sys.exit(main())
