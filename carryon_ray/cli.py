"""`carryon` command line.

  carryon train    --config FILE [--set key=value ...]   in-process customization (one machine)
  carryon generate --adapter DIR --prompt TEXT           generate with base + adapter
  carryon eval     --data FILE [--adapter DIR] [--gsm8k]   validation loss / exact match, base vs adapter
  carryon probe    [--base NAME] [--data FILE]            per-layer Macro Influence and shortcut gain
  carryon config   [--config FILE]                       print the validated config (defaults filled)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import yaml


def parse_overrides(pairs: list[str]) -> dict:
    """['train.epochs=1', 'data.train=x.jsonl'] -> {'train.epochs': 1, ...} (values parsed as YAML)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def _load(args):
    from .config import ConfigError, apply_overrides, load_config, validate_config

    try:
        if args.config:
            return load_config(args.config, parse_overrides(args.set))
        return validate_config(apply_overrides({}, parse_overrides(args.set)), "command-line settings")
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None


def cmd_train(args) -> int:
    from .train import fit_in_process

    cfg = _load(args)
    result = fit_in_process(cfg)
    print(json.dumps({
        "adapter": str(result.adapter_dir),
        "val_loss_before": round(result.val_loss_before, 4),
        "val_loss_after": round(result.val_loss_after, 4),
        "alpha": result.alpha,
        "embed_tokens_per_s": round(result.embed_tokens_per_s, 1),
        "train_tokens_per_s": round(result.train_tokens_per_s, 1),
    }, indent=2))
    return 0


def cmd_generate(args) -> int:
    from .config import BaseModelConfig
    from .generation import CarryOnModel

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


def cmd_eval(args) -> int:
    import os

    from .config import BaseModelConfig
    from .evaluation import evaluate_dataset

    result = evaluate_dataset(BaseModelConfig(name=args.base, dtype=args.dtype), args.adapter, args.data, args.format,
                              args.template, args.limit, args.max_new_tokens, args.alpha, args.gsm8k, args.max_length)
    print(json.dumps(result, indent=2, default=str))
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri and not args.no_mlflow:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(args.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(args.experiment)
        run = client.create_run(exp_id, run_name=f"eval {args.adapter or args.base}")
        for k, v in {"base": args.base, "adapter": args.adapter or "", "data": args.data, "gsm8k": args.gsm8k,
                     "max_new_tokens": args.max_new_tokens}.items():
            client.log_param(run.info.run_id, k, v)
        for name in ("base", "adapter"):
            for key in ("loss", "accuracy", "answered", "alpha"):
                if name in result and key in result[name]:
                    client.log_metric(run.info.run_id, f"{name}_{key}", float(result[name][key]))
        client.log_text(run.info.run_id, json.dumps(result, indent=2, default=str), "eval.json")
        client.set_terminated(run.info.run_id)
        print(f"logged to MLflow run {run.info.run_id} ({uri})")
    return 0


def cmd_probe(args) -> int:
    import os
    from pathlib import Path

    from .base import FrozenBase
    from .config import BaseModelConfig
    from .probe import plot, probe

    base = FrozenBase.load(BaseModelConfig(name=args.base, dtype=args.dtype))
    layers = None if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    try:
        result = probe(base, args.data, args.tokens, layers, args.max_length, args.format, args.recommend)
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
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri and not args.no_mlflow:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(args.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(args.experiment)
        run = client.create_run(exp_id, run_name=f"probe {args.base}", tags={"carryon.base": args.base})
        rid = run.info.run_id
        for k, v in {"base": args.base, "data": args.data, "tokens": result.tokens,
                     "recommended_shallow": result.recommended}.items():
            client.log_param(rid, k, v)
        for k, v in enumerate(result.influence):
            client.log_metric(rid, "macro_influence", v, step=k)
        for j, g in result.gain.items():
            client.log_metric(rid, "shortcut_gain", g, step=j)
        client.log_metric(rid, "base_loss", result.base_loss)
        client.log_metric(rid, "top_only_explained", result.top_only)
        client.log_metric(rid, "noise_control_gain", result.control)
        client.log_artifact(rid, str(out / "probe.png"), "figures")
        client.log_artifact(rid, str(out / "probe.json"))
        client.set_terminated(rid)
        print(f"logged to MLflow run {rid} ({uri})")
    return 0


def cmd_config(args) -> int:
    print(yaml.safe_dump(_load(args).model_dump(mode="json"), sort_keys=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="carryon", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

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

    c = sub.add_parser("config", help="print a validated config with every default filled in")
    with_config(c)
    c.set_defaults(func=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
