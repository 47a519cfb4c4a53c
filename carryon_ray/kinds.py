"""Carry-on kinds behind one interface, and the table from a config's `carryon.kind` to each.

A kind answers the same questions wherever the code needs to know what a carry-on is (torchtune's
`AdapterModule` protocol and PEFT's type-to-model mapping are the models): how to build one for
training, how to rebuild one from an adapter file, what its adapter config records beyond the
common fields, how its model card describes it, how it is served, and whether it has a LoRA form.
Code outside this file asks the kind (`kind_of(...)`) instead of testing `kind == "..."`.

Two families today:
- head-side (mlp, transformer): a network on the base's final state, y = W (x + alpha * g * f); it
  runs after the base's forward on the states of its own rows (a transformer keeps its own cache).
- recycled: the base's own top blocks with low-rank deltas; it runs INSIDE the base's forward (its
  deltas are bound per row to the base's linear layers) and exports as a PEFT LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .config import ArchConfig, CarryOnConfig, HeadConfig
from .embedding import source_dims
from .model import CarryOn, add_deltas
from .recycled import RecycledTop, build_recycled, recycled_from_state

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cast_trainable(model: CarryOn, cfg: CarryOnConfig) -> CarryOn:
    """Cast parameters only: the inherited head buffer keeps the base's dtype (exactness at alpha 0)."""
    for p in model.parameters():
        p.data = p.data.to(DTYPES[cfg.train.dtype])
    return model


@dataclass(frozen=True)
class Kind:
    name: str
    # build(cfg, hidden_sizes, vocab_size, head_weight, head_bias, stages) -> a fresh carry-on for training
    build: Callable
    # from_state(arch, head, adapter_config, tensors, head_weight, head_bias) -> the carry-on of an adapter file
    from_state: Callable
    # adapter_fields(carryon) -> what its adapter_config.json records beyond the common fields
    adapter_fields: Callable
    # describe(adapter_config) -> (what it is, its shape): the model card's lines
    describe: Callable
    # serving: True = inside the base's forward (deltas bound per row), False = on the base's final state
    inside_base: bool
    # a standard PEFT LoRA form exists (carryon_ray/export.py)
    peft_export: bool


# -- head-side carry-ons ---------------------------------------------------------------------------


def _build_head_side(cfg: CarryOnConfig, hidden_sizes, vocab_size, head_weight=None, head_bias=None,
                     stages: int | None = None) -> CarryOn:
    arch = cfg.carryon if stages is None else cfg.carryon.model_copy(update={"stages": stages})
    model = CarryOn(arch, cfg.head, source_dims(hidden_sizes, cfg.layers.shallow), vocab_size, cfg.layers.fusion,
                    head_weight, head_bias, alpha=cfg.alpha.init)
    if arch.stage_lora_rank and arch.stages > 1:  # a resumed growing run: rebuild the deltas it had
        for stage in model.stages[:-1]:
            add_deltas(stage, arch.stage_lora_rank)
        model.freeze_earlier_stages()
    return model.to(DTYPES[cfg.train.dtype]) if cfg.head.kind == "new" else cast_trainable(model, cfg)


def _head_side_from_state(arch: ArchConfig, head: HeadConfig, cfg: dict, tensors, head_weight=None, head_bias=None):
    return CarryOn(arch, head, cfg["dims"], cfg["vocab_size"], cfg["fusion"], head_weight, head_bias, cfg["alphas"][-1])


def _describe_head_side(config: dict) -> tuple[str, str]:
    arch = config["carryon"]
    return ("A carry-on (GPT Carry-On, arXiv 2504.07513): a small network trained on the frozen base's final "
            "hidden states, applied as y = W (x + alpha * g * f). With alpha = 0 the output is the base's own.",
            f"{arch['kind']}, width {arch['width']}, {arch.get('stages', 1)} stage(s)")


HEAD_SIDE = dict(build=_build_head_side, from_state=_head_side_from_state, adapter_fields=lambda carryon: {},
                 describe=_describe_head_side, inside_base=False, peft_export=False)


# -- recycled top blocks ---------------------------------------------------------------------------


def _build_recycled(cfg: CarryOnConfig, hidden_sizes, vocab_size, head_weight=None, head_bias=None,
                    stages: int | None = None) -> RecycledTop:
    return build_recycled(cfg, head_weight, head_bias, DTYPES[cfg.train.dtype])


def _describe_recycled(config: dict) -> tuple[str, str]:
    arch = config["carryon"]
    return ("A recycled-top carry-on (carryon-ray): the base's own top blocks with low-rank deltas "
            "W + alpha * B A, trained on the cached state entering the first of them. With alpha = 0 the "
            "output is the base's own.",
            f"recycled: top {arch['depth']} blocks ({config['tap']}..{config['num_layers'] - 1}, reading the "
            f"state entering block {config['tap']}), rank-{arch['rank']} deltas on {', '.join(arch['targets'])}")


RECYCLED = Kind("recycled", build=_build_recycled, from_state=recycled_from_state,
                adapter_fields=lambda c: {"num_layers": c.num_layers, "tap": c.first},  # which blocks the deltas adapt
                describe=_describe_recycled, inside_base=True, peft_export=True)

KINDS: dict[str, Kind] = {"mlp": Kind("mlp", **HEAD_SIDE), "transformer": Kind("transformer", **HEAD_SIDE),
                          "recycled": RECYCLED}


def kind_of(name: str) -> Kind:
    """The implementation of `carryon.kind` `name` (KeyError names the known kinds)."""
    try:
        return KINDS[name]
    except KeyError:
        raise KeyError(f"unknown carry-on kind {name!r}; known: {', '.join(KINDS)}") from None
