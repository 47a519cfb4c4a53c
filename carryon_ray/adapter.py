"""Adapter files: data, not code, in the layout Hugging Face adapter users expect.

An adapter directory holds
  adapter_config.json        `base_model_name_or_path`, the carry-on's architecture (only the fields
                             its kind uses), alphas, bridge, base fingerprint(s), training summary,
                             and the SHA-256 of the weights file
  adapter_model.safetensors  the carry-on weights (never the inherited head) and the bridge calibration
  README.md                  a model card: base, data, chosen alpha, validation and held-out figures,
                             how to load it

Loading parses JSON and safetensors only (nothing is unpickled), checks the weights hash (a
truncated or tampered file fails cleanly), and refuses a base whose fingerprint differs from the
one the carry-on was trained on. Adapters written by carryon-ray 0.1 before this layout (format
version 1: adapter.safetensors, the whole arch) still load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file, save_file

from . import __version__
from .bridge import Bridges, bridges_from_state, bridges_state
from .config import ArchConfig, HeadConfig
from .kinds import kind_of
from .model import CarryOn, fold_deltas

FORMAT = "carryon-adapter"
VERSION = 2
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
CARD = "README.md"
WEIGHTS_BY_VERSION = {1: "adapter.safetensors", 2: WEIGHTS}


class AdapterError(ValueError):
    """The adapter cannot be used: unreadable, tampered, or for another base."""


class AdapterConfig(BaseModel):
    """adapter_config.json, the versioned on-disk format (VERSION). Written by `save_adapter`, checked
    field by field by `read_adapter_config`; unknown keys are kept (a newer writer may add some)."""

    model_config = ConfigDict(extra="allow")

    format: Literal["carryon-adapter"] = Field(FORMAT, description="Marks a carry-on adapter (not a PEFT one).")
    version: int = Field(VERSION, description="Format version; readers accept WEIGHTS_BY_VERSION's keys.")
    library: str = Field("carryon-ray", description="The library that wrote it.")
    library_version: str | None = Field(None, description="Its version.")
    base_model_name_or_path: str | None = Field(None, description="The base it was trained on (name or path).")
    carryon: dict[str, Any] = Field(description="The carry-on's architecture: the fields its kind uses.")
    head: dict[str, Any] = Field(description="The output head: kind, and bottleneck / rank when used.")
    fusion: str = Field(description="How the sources are fused (carryon_ray.model).")
    dims: list[list[int]] = Field(description="Per base, the widths of its sources (deep state, shallow layers).")
    vocab_size: int = Field(gt=0, description="The base's vocabulary size.")
    shallow: list[int] = Field(default_factory=list, description="Shallow layers read besides the deep state.")
    alphas: list[float] = Field(min_length=1, description="Alpha per stage (the last one is the served alpha).")
    bridge_bits: int = Field(ge=0, description="Bits per value of the bridge codes (0: raw states).")
    fingerprints: list[dict[str, Any]] = Field(description="Per base: the fingerprint checked at load.")
    trainable_params: int | None = Field(None, description="Parameters the carry-on trained.")
    training: dict[str, Any] = Field(default_factory=dict, description="The training summary (losses, alpha, data).")
    weights_sha256: str = Field(description="SHA-256 of the weights file; checked before the weights are read.")
    num_layers: int | None = Field(None, description="Recycled-top: the base's block count.")
    tap: int | None = Field(None, description="Recycled-top: the first adapted block (the state entering it is read).")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_adapter(
    out_dir: str | Path,
    carryon: CarryOn,
    bridges: Bridges,
    shallow: list[int],
    fingerprints: list[dict],
    base_name: str,
    training: dict | None = None,
) -> Path:
    """Write the adapter directory (config, weights, model card); returns its path. A recycled-top
    carry-on writes its deltas (A, B) and alpha only; the blocks they adapt are the base's."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fold_deltas(carryon)  # growing's deltas on earlier stages ship folded into plain weights
    tensors = {k: v.detach().cpu().contiguous() for k, v in carryon.state_dict().items()}
    tensors.update({k: v.detach().cpu().contiguous() for k, v in bridges_state(bridges).items()})
    save_file(tensors, str(out / WEIGHTS), metadata={"format": FORMAT})
    head = {"kind": carryon.head_cfg.kind} | ({"bottleneck": carryon.head_cfg.bottleneck}
                                              if carryon.head_cfg.kind == "new" else {}) \
        | ({"rank": carryon.head_cfg.rank} if carryon.head_cfg.rank else {})
    config = AdapterConfig(
        library_version=__version__, base_model_name_or_path=base_name, carryon=carryon.arch.used_fields(),
        head=head, fusion=carryon.fusion_mode, dims=carryon.dims, vocab_size=carryon.vocab_size,
        shallow=list(shallow), alphas=[float(a) for a in carryon.alphas], bridge_bits=bridges[0][0].bits,
        fingerprints=fingerprints, trainable_params=carryon.num_params(),
        training=json.loads(json.dumps(training or {}, default=str)), weights_sha256=_sha256(out / WEIGHTS),
        **kind_of(carryon.arch.kind).adapter_fields(carryon),
    ).model_dump(mode="json", exclude_none=True)
    (out / CONFIG).write_text(json.dumps(config, indent=2, default=str))
    (out / CARD).write_text(model_card(config))
    return out


def model_card(config: dict) -> str:
    """A Hugging Face-style README.md for an adapter config."""
    t = config.get("training") or {}
    base = config["base_model_name_or_path"]
    what, shape = kind_of(config["carryon"]["kind"]).describe(config)
    lines = ["---", "library_name: carryon-ray", f"base_model: {base}", "tags: [carryon, adapter, carry-on]", "---",
             "", f"# Carry-on adapter for `{base}`", "", what, "",
             "| | |", "|---|---|",
             f"| base | `{base}` ({len(config['fingerprints'])} base(s), checked by fingerprint at load) |",
             f"| carry-on | {shape}, {config.get('trainable_params', 0):,} parameters |",
             f"| head | {config['head']['kind']}"
             + (f", rank-{config['head']['rank']} correction scaled by alpha" if config['head'].get('rank') else "")
             + " |",
             f"| alpha (chosen on validation data) | {', '.join(f'{a:g}' for a in config['alphas'])} |",
             f"| bridge | {config['bridge_bits'] or 'no'}-bit codes, shallow layers {config['shallow'] or 'none'} |"]
    if t.get("val_loss_before") is not None and t.get("val_loss_after") is not None:
        lines.append(f"| validation loss | {t['val_loss_before']:.4f} (base) -> {t['val_loss_after']:.4f} |")
    held = t.get("heldout")
    if held:
        lines.append(f"| held-out accuracy ({held['rows']} prompts) | base {held['base_accuracy']:.0%}, "
                     f"with this adapter {held['adapter_accuracy']:.0%} |")
    for d in t.get("data", []):
        lines.append(f"| data | {d} |")
    lines += ["", "## Use it", "", "```python", "from carryon_ray.generation import CarryOnModel", "",
              "model = CarryOnModel.from_pretrained(\"path/to/this/directory\")  # or \"models:/NAME@ALIAS\"",
              "ids = model.tokenizer(\"...\", add_special_tokens=False)[\"input_ids\"]",
              "print(model.tokenizer.decode(model.generate([ids], max_new_tokens=32)[0]))", "```", "",
              "Serve it: list it under `adapters:` in a serve config (or register it in MLflow with the tag "
              "`carryon.owner`) and run `carryon serve`. Files: adapter_config.json, adapter_model.safetensors "
              "(data only: nothing is unpickled at load).", ""]
    return "\n".join(lines)


URI_RESOLVERS = "carryon_ray.adapter_uris"  # entry-point group: URI scheme -> fn(uri, dst) -> local dir


def resolve_adapter(ref: str | Path, dst: str | Path | None = None) -> Path:
    """A local adapter directory for `ref`: a path, or a URI whose scheme an installed integration
    resolves (carryon_mlflow registers models:/, runs:/ and mlflow-artifacts:/). The core itself
    knows no registry: resolvers are found through the `carryon_ray.adapter_uris` entry points."""
    ref = str(ref)
    scheme, sep, _ = ref.partition(":/")
    if not sep or len(scheme) < 2 or "/" in scheme:  # a plain path (or a Windows drive letter)
        return Path(ref)
    from importlib.metadata import entry_points

    for ep in entry_points(group=URI_RESOLVERS):
        if ep.name == scheme:
            return Path(ep.load()(ref, dst))
    raise AdapterError(f"{ref}: no resolver installed for {scheme}:/ adapter URIs (carryon-ray's MLflow "
                       "integration provides models:/, runs:/ and mlflow-artifacts:/; reinstall the package)")


def read_adapter_config(path: str | Path) -> dict:
    """The adapter's config, normalised to the current format (`arch` holds every field)."""
    path = Path(path)
    cfg_path = path / CONFIG
    if not cfg_path.is_file():
        raise AdapterError(f"{path}: not an adapter directory (needs {CONFIG} and {WEIGHTS})")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{cfg_path}: unreadable adapter config ({exc})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise AdapterError(f"{cfg_path}: not a {FORMAT} config (a PEFT/LoRA adapter is not a carry-on adapter)")
    version = cfg.get("version")
    if version not in WEIGHTS_BY_VERSION:
        raise AdapterError(f"{cfg_path}: adapter format version {version} is not supported (this carryon-ray reads "
                           f"{sorted(WEIGHTS_BY_VERSION)}); upgrade carryon-ray, or re-save the adapter with it")
    if not (path / WEIGHTS_BY_VERSION[version]).is_file():
        raise AdapterError(f"{path}: not an adapter directory (needs {CONFIG} and {WEIGHTS_BY_VERSION[version]})")
    if version == 1:  # carryon-ray 0.1: the whole arch under "arch", the base name under "tokenizer"
        cfg = {**cfg, "carryon": cfg["arch"], "base_model_name_or_path": cfg.get("tokenizer")}
    try:
        cfg = AdapterConfig.model_validate(cfg).model_dump(mode="json", exclude_none=True)
    except ValidationError as exc:
        fields = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise AdapterError(f"{cfg_path}: invalid adapter config ({fields})") from None
    try:
        cfg["arch"] = ArchConfig(**cfg["carryon"]).model_dump()
    except Exception as exc:  # noqa: BLE001 - a hand-edited or corrupt config
        raise AdapterError(f"{cfg_path}: the carry-on's architecture is invalid: {exc}") from None
    cfg["weights_file"] = WEIGHTS_BY_VERSION[version]
    return cfg


def verified_weights(path: Path, cfg: dict) -> Path:
    """The adapter's weights file, after checking it against the SHA-256 its config records."""
    weights = Path(path) / cfg["weights_file"]
    if _sha256(weights) != cfg.get("weights_sha256"):
        raise AdapterError(f"{weights}: checksum mismatch (truncated or modified file)")
    return weights


def load_adapter(
    path: str | Path,
    fingerprints: list[dict] | None = None,
    head_weight: torch.Tensor | None = None,
    head_bias: torch.Tensor | None = None,
) -> tuple[CarryOn, Bridges, dict]:
    """Rebuild (carry-on, bridges, config) from an adapter directory.

    `fingerprints` are those of the bases it will run on; a mismatch raises AdapterError.
    `head_weight` is the base's output head, needed for an inherited head.
    """
    path = Path(path)
    cfg = read_adapter_config(path)
    if fingerprints is not None:
        want = cfg.get("fingerprints", [])
        if len(want) != len(fingerprints):
            raise AdapterError(f"{path}: adapter was trained on {len(want)} base(s), {len(fingerprints)} given")
        for i, (a, b) in enumerate(zip(want, fingerprints)):
            diffs = [f"{k}: adapter has {a.get(k)!r}, base has {v!r}" for k, v in b.items() if a.get(k) != v]
            if diffs:
                raise AdapterError(f"{path}: base {i} is not the base this adapter was trained on ({'; '.join(diffs)})")
    weights = verified_weights(path, cfg)
    try:
        tensors = load_file(str(weights))
        arch, head = ArchConfig(**cfg["arch"]), HeadConfig(**cfg["head"])
        carryon = kind_of(arch.kind).from_state(arch, head, cfg, tensors, head_weight, head_bias)
        bridges = bridges_from_state(cfg["bridge_bits"], cfg["dims"], tensors)
        state = {k: v for k, v in tensors.items() if not k.startswith("bridge.")}
        carryon.load_state_dict(state, strict=True)
    except AdapterError:
        raise
    except Exception as exc:  # safetensors header errors, shape mismatches, bad config values
        raise AdapterError(f"{path}: adapter cannot be loaded: {exc}") from None
    if head.kind == "inherited" and head_weight is None:
        raise AdapterError(f"{path}: inherited head needs the base's output head weight")
    carryon.freeze_earlier_stages()
    return carryon.eval(), bridges, cfg
