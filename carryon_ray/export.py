"""Adapters in other formats: a recycled-top adapter as a standard PEFT LoRA.

The recycled kind's deltas are LoRA's numbers (W + alpha B A on the base's own linear layers), so the
export only renames tensors and folds alpha into lora_alpha; peft, vLLM multi-LoRA and Ray Serve LLM
then load it like any LoRA. Kinds that read the final state have no LoRA form (`Kind.peft_export`).

A LoRA is only right on the weights it was trained on. The export names a base others can load
(`base_model_name_or_path`): the adapter's own when that is a Hugging Face directory or hub id,
else the caller's `base_path`, else it refuses; the bundled SmolLM2 is a Q4_1 GGUF whose dequantized
weights differ from the hub's SmolLM2, so pairing the export with the hub's model would serve other
logits. `with_base` writes those exact dequantized weights (fp32 safetensors and the tokenizer,
checked against the adapter's base fingerprint) beside the export and names them. The fingerprint
goes in carryon_export.json and the README.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from .adapter import AdapterError, read_adapter_config, verified_weights
from .kinds import kind_of
from .recycled import TARGET_PATHS


def loadable_elsewhere(name: str) -> bool:
    """Whether peft / vLLM can load `name` as a base: a Hugging Face directory or a hub id; not a
    GGUF file, the bundled alias, or a directory without config.json."""
    from .base import SMOLLM2_ALIAS

    if name == SMOLLM2_ALIAS or name.endswith(".gguf"):
        return False
    path = Path(name)
    return (path / "config.json").is_file() if path.exists() else "/" in name and not name.startswith((".", "/"))


def write_base(recorded: str, fingerprint: dict, out_dir: str | Path) -> Path:
    """The adapter's base, as it was loaded for training (a GGUF dequantized), written as fp32
    safetensors + tokenizer in `out_dir`; refuses when the loaded base is not the fingerprinted one."""
    from .base import FrozenBase
    from .config import BaseModelConfig

    base = FrozenBase.load(BaseModelConfig(name=recorded, dtype="float32"))
    got = base.fingerprint().to_dict()
    diff = sorted(k for k in fingerprint if k in got and got[k] != fingerprint[k])
    if diff:
        raise AdapterError(f"the base {recorded!r} on this machine is not the one the adapter was trained on "
                           f"(fingerprint differs in {diff}); export where that base is, or pass --base-path")
    out = Path(out_dir)
    base.model.save_pretrained(out, safe_serialization=True)
    base.tokenizer.save_pretrained(out)
    return out.resolve()


def export_peft(adapter_dir: str | Path, out_dir: str | Path, base_path: str | None = None,
                with_base: str | Path | None = None) -> Path:
    """Write a recycled-top adapter as a PEFT LoRA directory (adapter_config.json with target_modules,
    layers_to_transform, r, lora_alpha = alpha * r so PEFT's scaling lora_alpha / r is our alpha;
    adapter_model.safetensors with lora_A / lora_B per layer). Reads the adapter as data only.
    `base_path` names the base to record; `with_base` writes the exact base there and records it."""
    src = Path(adapter_dir)
    cfg = read_adapter_config(src)
    arch = cfg["arch"]
    if not kind_of(arch["kind"]).peft_export:
        raise AdapterError(f"{src}: a {arch['kind']} carry-on reads the final state and has no LoRA form; only "
                           "carryon.kind: recycled adapters export to PEFT")
    recorded = cfg["base_model_name_or_path"]
    fingerprint = (cfg.get("fingerprints") or [{}])[0]
    if with_base is not None:
        written = write_base(recorded, fingerprint, with_base)
        base_path = base_path or str(written)
    elif base_path is None:
        if not loadable_elsewhere(recorded):
            raise AdapterError(f"the adapter's base {recorded!r} is a GGUF file or a local alias that peft and vLLM "
                               "cannot load: pass --with-base DIR (writes the exact dequantized base there and names "
                               "it) or --base-path (a Hugging Face directory or hub id with the same weights)")
        base_path = recorded
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
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path,
        "r": r, "lora_alpha": alpha * r, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": list(arch["targets"]), "layers_to_transform": list(range(first, first + int(arch["depth"]))),
        "layers_pattern": "layers", "use_rslora": False, "use_dora": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None,
        "revision": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    (out / "carryon_export.json").write_text(json.dumps({
        "base_model_name_or_path": base_path, "trained_on": recorded, "base_fingerprint": fingerprint,
        "base_written": with_base is not None}, indent=2))
    (out / "README.md").write_text(
        f"---\nlibrary_name: peft\nbase_model: {config['base_model_name_or_path']}\ntags: [lora, carryon]\n---\n\n"
        f"# LoRA exported from a carryon-ray recycled-top adapter\n\nRank-{r} deltas on {', '.join(arch['targets'])} "
        f"of blocks {first}..{first + int(arch['depth']) - 1}; lora_alpha = {alpha:g} x r folds the alpha chosen on "
        "validation data. Load with `AutoPeftModelForCausalLM.from_pretrained(this_dir)` (it loads the base named "
        f"above), or serve with vLLM multi-LoRA on that base.\n\nTrained on `{recorded}`; base fingerprint "
        f"(checked by carryon-ray at load): `{json.dumps(fingerprint, sort_keys=True)}`. Only the weights it names "
        "give the trained logits: a base of the same name with other weights (e.g. the hub's SmolLM2 in place of the "
        "dequantized Q4_1 GGUF) does not.\n")
    return out
