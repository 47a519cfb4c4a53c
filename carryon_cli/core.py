"""Core commands of `carryon`: the ones that need no cluster.

  carryon train    --config FILE [--set key=value ...]   in-process customization (one machine)
  carryon generate --adapter DIR --prompt TEXT           generate with base + adapter
  carryon eval     --data FILE [--adapter DIR] [--gsm8k]   validation loss / exact match, base vs adapter
  carryon probe    [--base NAME] [--data FILE]            per-layer Macro Influence and shortcut gain
  carryon config   [--config FILE]                       print the validated config (defaults filled)
  carryon export   --format peft ADAPTER DIR             a recycled-top adapter as a standard PEFT LoRA
"""

from __future__ import annotations

import json

import sys

import yaml


def bar(items, desc: str = "", total: int | None = None):
    """A tqdm progress bar on a terminal; in a log (stderr not a terminal), one line with the rate and
    an ETA at the first item and then every ~30 s (carryon_ray.progress.lines)."""
    if not sys.stderr.isatty():
        from carryon_ray.progress import lines

        return lines(items, desc, total)
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True)


def _load(args):
    from carryon_ray.config import ConfigError, apply_overrides, load_config, parse_overrides, validate_config

    try:
        if args.config:
            return load_config(args.config, parse_overrides(args.set))
        return validate_config(apply_overrides({}, parse_overrides(args.set)), "command-line settings")
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None


def cmd_train(args) -> int:
    """The in-process backend of the one pipeline, tracked in MLflow exactly like the Ray job when
    the config (or $MLFLOW_TRACKING_URI) names a tracking server."""
    from carryon_mlflow.tracking import registration, tracked_run
    from carryon_ray.pipeline import fit_in_process

    cfg = _load(args)
    with tracked_run(cfg, {"carryon.runner": "in-process"}) as tracker:
        summary = fit_in_process(cfg, tracker.reporter, progress=bar, finish=registration(tracker))
    print(json.dumps({k: summary.get(k) for k in ("adapter", "val_loss_before", "val_loss_after", "alpha", "steps",
                                                  "epochs", "run_id", "model_version")}, indent=2))
    return 0


def cmd_generate(args) -> int:
    from carryon_ray.config import BaseModelConfig
    from carryon_ray.generation import CarryOnModel

    model = CarryOnModel.from_pretrained(BaseModelConfig(name=args.base, dtype=args.dtype), args.adapter)
    tok = model.tokenizer
    if args.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
    else:
        ids = tok(args.prompt, add_special_tokens=False)["input_ids"]
    out = model.generate([list(ids)], args.max_tokens, args.temperature, args.top_p, args.seed, args.alpha)[0]
    print(tok.decode(out, skip_special_tokens=True))
    return 0


def _tracker(args, run_name: str, tags: dict | None = None):
    """An MLflow run for eval/probe when $MLFLOW_TRACKING_URI is set (and --no-mlflow is not)."""
    from carryon_mlflow.tracking import Tracker, tracking_uri

    return Tracker(None if args.no_mlflow else tracking_uri(None), args.experiment, run_name)


def cmd_eval(args) -> int:
    from carryon_ray.config import BaseModelConfig
    from carryon_ray.evaluation import evaluate_dataset

    result = evaluate_dataset(BaseModelConfig(name=args.base, dtype=args.dtype), args.adapter, args.data, args.format,
                              args.template, args.limit, args.max_new_tokens, args.alpha, args.gsm8k, args.max_length,
                              progress=bar)
    print(json.dumps(result, indent=2, default=str))
    tracker = _tracker(args, f"eval {args.adapter or args.base}")
    if tracker.client:
        tracker.start({"base": args.base, "adapter": args.adapter or "", "data": args.data, "gsm8k": args.gsm8k,
                       "max_new_tokens": args.max_new_tokens})
        tracker.metrics({f"{name}_{key}": float(result[name][key]) for name in ("base", "adapter") if name in result
                         for key in ("loss", "accuracy", "answered", "alpha") if key in result[name]})
        tracker.text(json.dumps(result, indent=2, default=str), "eval.json")
        tracker.end("FINISHED")
        print(f"logged to MLflow run {tracker.run_id} ({tracker.uri})")
    return 0


def cmd_probe(args) -> int:
    from pathlib import Path

    from carryon_ray.base import FrozenBase
    from carryon_ray.config import BaseModelConfig
    from carryon_ray.probe import plot, probe

    base = FrozenBase.load(BaseModelConfig(name=args.base, dtype=args.dtype))
    layers = None if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    try:
        result = probe(base, args.data, args.tokens, layers, args.max_length, args.format, args.recommend,
                       progress=bar)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(result.to_dict(), indent=2))
    plot(result, str(out / "probe.png"))
    print(json.dumps({"recommended_shallow": result.recommended, "least_influential_blocks": result.least_influential,
                      "base_loss": round(result.base_loss, 4), "top_only_explained": round(result.top_only, 4),
                      "gain": {k: round(v, 4) for k, v in result.gain.items()}, "noise_control": round(result.control, 4),
                      "out": str(out)}, indent=2))
    tracker = _tracker(args, f"probe {args.base}")
    if tracker.client:
        tracker.start({"base": args.base, "data": args.data, "tokens": result.tokens,
                       "recommended_shallow": result.recommended}, tags={"carryon.base": args.base})
        for k, v in enumerate(result.influence):
            tracker.metrics({"macro_influence": v}, step=k)
        for j, g in result.gain.items():
            tracker.metrics({"shortcut_gain": g}, step=j)
        tracker.metrics({"base_loss": result.base_loss, "top_only_explained": result.top_only,
                         "noise_control_gain": result.control})
        tracker.client.log_artifact(tracker.run_id, str(out / "probe.png"), "figures")
        tracker.client.log_artifact(tracker.run_id, str(out / "probe.json"))
        tracker.end("FINISHED")
        print(f"logged to MLflow run {tracker.run_id} ({tracker.uri})")
    return 0


def cmd_export(args) -> int:
    """A recycled-top adapter (directory or models:/ URI) as a PEFT LoRA directory: peft, vLLM multi-LoRA
    and Ray Serve LLM load it as any LoRA."""
    from carryon_ray.adapter import AdapterError, resolve_adapter
    from carryon_ray.export import export_peft

    try:
        out = export_peft(resolve_adapter(args.adapter), args.out, args.base_path, args.with_base)
    except AdapterError as exc:
        raise SystemExit(f"error: {exc}") from None
    conf = json.loads((out / "adapter_config.json").read_text())
    print(json.dumps({"out": str(out), **{k: conf[k] for k in ("r", "lora_alpha", "target_modules",
                                                                "layers_to_transform", "base_model_name_or_path")}},
                     indent=2))
    return 0


def cmd_config(args) -> int:
    print(yaml.safe_dump(_load(args).model_dump(mode="json"), sort_keys=False))
    return 0


def add_commands(sub) -> None:
    def with_config(sp):
        sp.add_argument("--config", help="YAML config file (see configs/)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.epochs=1 (repeatable)")

    t = sub.add_parser("train", help="customize in this process (no cluster)")
    with_config(t)
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="generate text with base + adapter")
    g.add_argument("--base", default="smollm2-135m-instruct", help="base model (name, directory or .gguf)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    g.add_argument("--adapter", help="adapter directory or MLflow URI models:/NAME@ALIAS (omit for the bare base)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--alpha", type=float, default=None, help="override the adapter's alpha")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="validation loss and GSM8K exact match of the base and base + adapter")
    e.add_argument("--base", default="smollm2-135m-instruct", help="base model (name, directory or .gguf)")
    e.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    e.add_argument("--adapter", help="adapter directory or models:/NAME@ALIAS (omit to score the base only)")
    e.add_argument("--data", required=True, help="jsonl/txt file (any format the job reads)")
    e.add_argument("--format", default="auto", choices=["auto", "text", "prompt_completion", "qa", "chat"])
    e.add_argument("--template", help="prompt template for 'qa' rows (default: the job's)")
    e.add_argument("--limit", type=int, default=None, help="score at most this many rows")
    e.add_argument("--gsm8k", action="store_true", help="also greedy exact match on question/answer rows (#### answers)")
    e.add_argument("--max-new-tokens", type=int, default=256)
    e.add_argument("--max-length", type=int, default=512)
    e.add_argument("--alpha", type=float, default=None, help="override the adapter's alpha")
    e.add_argument("--experiment", default="carryon-eval", help="MLflow experiment (when MLFLOW_TRACKING_URI is set)")
    e.add_argument("--no-mlflow", action="store_true")
    e.set_defaults(func=cmd_eval)

    pr = sub.add_parser("probe", help="which base blocks matter and which shallow layers to feed the carry-on")
    pr.add_argument("--base", default="smollm2-135m-instruct", help="base model (name, directory or .gguf)")
    pr.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    pr.add_argument("--data", default="builtin:arithmetic", help="calibration rows (any file the job reads)")
    pr.add_argument("--format", default="auto", choices=["auto", "text", "prompt_completion", "qa", "chat"])
    pr.add_argument("--tokens", type=int, default=2048, help="calibration tokens (whole rows)")
    pr.add_argument("--max-length", type=int, default=256)
    pr.add_argument("--layers", default="all", help="shallow layers to test, e.g. 0,8,16,24 (default: every one)")
    pr.add_argument("--recommend", type=int, default=2, help="how many shortcut layers to recommend")
    pr.add_argument("--out", default="outputs/probe", help="directory for probe.json and probe.png")
    pr.add_argument("--experiment", default="carryon-probe", help="MLflow experiment (when MLFLOW_TRACKING_URI is set)")
    pr.add_argument("--no-mlflow", action="store_true")
    pr.set_defaults(func=cmd_probe)

    x = sub.add_parser("export", help="write a recycled-top adapter as a standard PEFT LoRA (peft, vLLM, Ray Serve LLM)")
    x.add_argument("--format", choices=["peft"], default="peft", help="the output format")
    x.add_argument("adapter", help="adapter directory or models:/NAME@ALIAS (carryon.kind: recycled)")
    x.add_argument("out", help="directory to write the PEFT adapter into")
    x.add_argument("--base-path", default=None, help="base_model_name_or_path to record: a Hugging Face directory or "
                   "hub id with the adapter's weights (required when its base is a GGUF file or a local alias)")
    x.add_argument("--with-base", default=None, metavar="DIR", help="also write the exact base the adapter was trained "
                   "on (a GGUF dequantized to fp32 safetensors + tokenizer) to DIR and record it")
    x.set_defaults(func=cmd_export)

    c = sub.add_parser("config", help="print a validated config with every default filled in")
    with_config(c)
    c.set_defaults(func=cmd_config)
