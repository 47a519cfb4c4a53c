"""Adapter files: data, not code.

An adapter directory holds
  adapter.safetensors    the carry-on weights (never the inherited head) and the bridge calibration
  adapter_config.json    architecture, alphas, bridge, base fingerprint(s), tokenizer, training
                         summary, and the SHA-256 of the weights file

Loading parses JSON and safetensors only (nothing is unpickled), checks the weights hash (a
truncated or tampered file fails cleanly), and refuses a base whose fingerprint differs from the
one the carry-on was trained on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .bridge import Bridges, bridges_from_state, bridges_state
from .config import ArchConfig, HeadConfig
from .model import CarryOn, fold_deltas

FORMAT = "carryon-adapter"
VERSION = 1
WEIGHTS = "adapter.safetensors"
CONFIG = "adapter_config.json"


class AdapterError(ValueError):
    """The adapter cannot be used: unreadable, tampered, or for another base."""


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
    tokenizer_name: str,
    training: dict | None = None,
) -> Path:
    """Write the adapter directory; returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fold_deltas(carryon)  # recycled blocks ship as plain weights W + B A: serving needs no base blocks
    tensors = {k: v.detach().cpu().contiguous() for k, v in carryon.state_dict().items()}
    tensors.update({k: v.detach().cpu().contiguous() for k, v in bridges_state(bridges).items()})
    save_file(tensors, str(out / WEIGHTS))
    config = {
        "format": FORMAT,
        "version": VERSION,
        "arch": carryon.arch.model_dump(),
        "head": carryon.head_cfg.model_dump(),
        "fusion": carryon.fusion_mode,
        "dims": carryon.dims,
        "vocab_size": carryon.vocab_size,
        "shallow": list(shallow),
        "alphas": [float(a) for a in carryon.alphas],
        "bridge_bits": bridges[0][0].bits,
        "fingerprints": fingerprints,
        "tokenizer": tokenizer_name,
        "training": training or {},
        "weights_sha256": _sha256(out / WEIGHTS),
    }
    (out / CONFIG).write_text(json.dumps(config, indent=2))
    return out


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
    path = Path(path)
    cfg_path = path / CONFIG
    if not cfg_path.is_file() or not (path / WEIGHTS).is_file():
        raise AdapterError(f"{path}: not an adapter directory (needs {CONFIG} and {WEIGHTS})")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{cfg_path}: unreadable adapter config ({exc})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise AdapterError(f"{cfg_path}: not a {FORMAT} config")
    if cfg.get("version") != VERSION:
        raise AdapterError(f"{cfg_path}: adapter format version {cfg.get('version')} is not supported (need {VERSION})")
    return cfg


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
    if _sha256(path / WEIGHTS) != cfg.get("weights_sha256"):
        raise AdapterError(f"{path / WEIGHTS}: checksum mismatch (truncated or modified file)")
    try:
        tensors = load_file(str(path / WEIGHTS))
        arch, head = ArchConfig(**cfg["arch"]), HeadConfig(**cfg["head"])
        carryon = CarryOn(
            arch, head, cfg["dims"], cfg["vocab_size"], cfg["fusion"], head_weight, head_bias, cfg["alphas"][-1]
        )
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
