"""Adapters in other formats: a recycled-top adapter as a standard PEFT LoRA.

The recycled kind's deltas are LoRA's numbers (W + alpha B A on the base's own linear layers), so the
export only renames tensors and folds alpha into lora_alpha; peft, vLLM multi-LoRA and Ray Serve LLM
then load it like any LoRA. Kinds that read the final state have no LoRA form (`Kind.peft_export`).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from .adapter import AdapterError, read_adapter_config, verified_weights
from .kinds import kind_of
from .recycled import TARGET_PATHS


def export_peft(adapter_dir: str | Path, out_dir: str | Path, base_path: str | None = None) -> Path:
    """Write a recycled-top adapter as a PEFT LoRA directory (adapter_config.json with target_modules,
    layers_to_transform, r, lora_alpha = alpha * r so PEFT's scaling lora_alpha / r is our alpha;
    adapter_model.safetensors with lora_A / lora_B per layer). Reads the adapter as data only."""
    src = Path(adapter_dir)
    cfg = read_adapter_config(src)
    arch = cfg["arch"]
    if not kind_of(arch["kind"]).peft_export:
        raise AdapterError(f"{src}: a {arch['kind']} carry-on reads the final state and has no LoRA form; only "
                           "carryon.kind: recycled adapters export to PEFT")
    tensors = load_file(str(verified_weights(src, cfg)))
    first, r, alpha = int(cfg["num_layers"]) - int(arch["depth"]), int(arch["rank"]), float(cfg["alphas"][-1])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lora = {}
    for j in range(int(arch["depth"])):
        for t in arch["targets"]:
            prefix = f"base_model.model.model.layers.{first + j}.{TARGET_PATHS[t]}"
            lora[f"{prefix}.lora_A.weight"] = tensors[f"deltas.{j}.{t}.A"].contiguous()
            lora[f"{prefix}.lora_B.weight"] = tensors[f"deltas.{j}.{t}.B"].contiguous()
    save_file(lora, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path or cfg["base_model_name_or_path"],
        "r": r, "lora_alpha": alpha * r, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": list(arch["targets"]), "layers_to_transform": list(range(first, first + int(arch["depth"]))),
        "layers_pattern": "layers", "use_rslora": False, "use_dora": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None,
        "revision": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    (out / "README.md").write_text(
        f"---\nlibrary_name: peft\nbase_model: {config['base_model_name_or_path']}\ntags: [lora, carryon]\n---\n\n"
        f"# LoRA exported from a carryon-ray recycled-top adapter\n\nRank-{r} deltas on {', '.join(arch['targets'])} "
        f"of blocks {first}..{first + int(arch['depth']) - 1}; lora_alpha = {alpha:g} x r folds the alpha chosen on "
        "validation data. Load with `PeftModel.from_pretrained(base, this_dir)`, or serve with vLLM multi-LoRA.\n")
    return out
