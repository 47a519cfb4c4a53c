"""Base + carry-on as a language model: loaded adapters, full-sequence logits, and generation
through the decode engine (carryon_ray/engine/: the scheduler, the model runner, the sampler).

`Adapter` is one loaded carry-on over a shared base, whatever its kind; `CarryOnModel` is the
user-facing model (Hugging Face style `from_pretrained` / `generate` / `logits`); `generate_mixed`
decodes rows that each use their own adapter in one engine, as a Serve replica does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .adapter import AdapterError, load_adapter, read_adapter_config, resolve_adapter
from .base import FrozenBase, positions_from_mask
from .bridge import Bridge, Bridges
from .config import BaseModelConfig
from .engine import Engine, Request
from .model import CarryOn
from .kinds import kind_of
from .recycled import bind_rows, serving_sites, unbind


# ---------------------------------------------------------------------------------------------
# Adapters.
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)  # identity: the engine keys an adapter's rows and cache by the object itself
class Adapter:
    """One loaded carry-on adapter over a shared base."""

    carryon: CarryOn
    bridges: Bridges
    shallow: list[int]
    config: dict

    @classmethod
    def load(cls, bases: FrozenBase | list[FrozenBase], ref: str | Path) -> "Adapter":
        """Load `ref` (a directory, or a URI such as models:/NAME@ALIAS) for the first
        len(its fingerprints) of `bases` (base 0 first: mixed-base adapters need the same bases in
        the same order, checked by fingerprint)."""
        bases = bases if isinstance(bases, list) else [bases]
        path = resolve_adapter(ref)
        n = len(read_adapter_config(path).get("fingerprints", [])) or 1
        if n > len(bases):
            raise AdapterError(f"{path}: adapter mixes {n} bases; this server holds {len(bases)}")
        base = bases[0]
        carryon, bridges, cfg = load_adapter(path, [b.fingerprint().to_dict() for b in bases[:n]],
                                             base.head_weight, base.head_bias)
        return cls(carryon, bridges, list(cfg["shallow"]), cfg).attach(base)

    def attach(self, base: FrozenBase) -> "Adapter":
        """Place the carry-on on the base's device. A recycled-top adapter runs inside the base's forward,
        in its dtype, through the linear wrappers every block of the base got once (`serving_sites`):
        attaching changes nothing in the base, so it is safe while an engine steps on another thread."""
        self.carryon = self.carryon.to(base.device)
        if self.inside:
            c = self.carryon
            sites = serving_sites(base)
            missing = [name for name, _ in c.pairs() if name not in sites]
            if missing:
                raise AdapterError(f"this base has no layer {missing[0]!r} for the adapter's deltas "
                                   "(recycled-top adapters need a Llama-style base)")
            for p in c.deltas.parameters():  # the deltas add to the base's activations in its dtype
                p.data = p.data.to(base.dtype)
        return self

    @property
    def inside(self) -> bool:
        """Served inside the base's forward (its deltas bound per row), not on the base's final state."""
        return kind_of(self.carryon.arch.kind).inside_base

    @property
    def num_bases(self) -> int:
        return len(self.bridges)

    @property
    def alpha(self) -> float:
        return self.carryon.alpha


# ---------------------------------------------------------------------------------------------
# The user-facing model and the many-adapter helper, both over the engine.
# ---------------------------------------------------------------------------------------------


def generate_mixed(bases: FrozenBase | list[FrozenBase], prompts: list[list[int]], adapters: list[Adapter | None],
                   max_new_tokens: list[int] | int = 64, temperature: list[float] | float = 0.0,
                   top_p: list[float] | float = 1.0, seeds: list[int | None] | None = None,
                   alphas: list[float | None] | None = None, stop_at_eos: bool = True,
                   progress=None, desc: str = "decode steps") -> list[list[int]]:
    """Generate for rows that may each use a different adapter (None = the bare base): one base
    forward per step for every row, one carry-on forward per adapter. Greedy output for a row
    equals `CarryOnModel.generate` with that row's adapter alone. `progress` wraps the steps."""
    n = len(prompts)

    def per(v, default=None):
        return list(v) if isinstance(v, (list, tuple)) else [v if v is not None else default] * n

    reqs = [Request(list(p), a, m, t, tp, s, al, stop_at_eos)
            for p, a, m, t, tp, s, al in zip(prompts, adapters, per(max_new_tokens), per(temperature), per(top_p),
                                             per(seeds), per(alphas))]
    engine = Engine(bases, max_rows=max(1, n), prefill_tokens=max(sum(len(p) for p in prompts), 1))
    return [s.tokens for s in engine.run(reqs, progress, desc)]


def _is_adapter(ref: str | Path) -> bool:
    """A URI (models:/...) or a directory holding an adapter config, rather than a base."""
    ref = str(ref)
    scheme, sep, _ = ref.partition(":/")
    return bool(sep and len(scheme) > 1 and "/" not in scheme) or (Path(ref) / "adapter_config.json").is_file()


class CarryOnModel:
    """A frozen base (or several) plus an optional carry-on adapter."""

    def __init__(self, bases: list[FrozenBase], carryon: CarryOn | None = None,
                 bridges: Bridges | Bridge | None = None, shallow: list[int] | tuple[int, ...] = (),
                 config: dict | None = None):
        self.bases = bases
        self.adapter: Adapter | None = None
        if carryon is not None:
            shallow = list(shallow)
            if bridges is None or isinstance(bridges, Bridge):  # one bridge for every stream
                one = bridges or Bridge(0)
                bridges = [[one] * (1 + len(shallow)) for _ in range(len(carryon.dims))]
            self.adapter = Adapter(carryon, bridges, shallow, config or {}).attach(bases[0])

    @property
    def carryon(self) -> CarryOn | None:
        return self.adapter.carryon if self.adapter else None

    @property
    def base(self) -> FrozenBase:
        return self.bases[0]

    @property
    def tokenizer(self):
        return self.base.tokenizer

    @classmethod
    def from_pretrained(cls, base: FrozenBase | str | BaseModelConfig | list, adapter: str | Path | None = None):
        """Load the base(s) if needed and attach the adapter (checked against their fingerprints).

        `CarryOnModel.from_pretrained(adapter)` alone, as with Hugging Face adapters, loads the base
        the adapter names (`base_model_name_or_path`); `from_pretrained(base, adapter)` pairs it with
        a base you already hold. An adapter is a directory or a URI such as models:/NAME@ALIAS."""
        if adapter is None and isinstance(base, (str, Path)) and _is_adapter(base):
            adapter = resolve_adapter(base)
            base = read_adapter_config(adapter)["base_model_name_or_path"]
        bases = base if isinstance(base, list) else [base]
        bases = [b if isinstance(b, FrozenBase) else FrozenBase.load(b) for b in bases]
        model = cls(bases)
        if adapter is not None:
            model.adapter = Adapter.load(bases, adapter)
        return model

    def save_pretrained(self, out_dir: str | Path, training: dict | None = None) -> Path:
        """Write the adapter (adapter_config.json, adapter_model.safetensors, README.md model card)."""
        from .adapter import save_adapter

        if self.adapter is None:
            raise AdapterError("this model has no carry-on adapter to save (the base itself is not saved)")
        a = self.adapter
        return save_adapter(out_dir, a.carryon, a.bridges, a.shallow,
                            [b.fingerprint().to_dict() for b in self.bases[: a.num_bases]], self.base.name,
                            training or a.config.get("training"))

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               alpha: float | None = None) -> torch.Tensor:
        """Full-sequence logits [B, T, V] of base + carry-on, one forward, no cache (left padding
        allowed: positions follow the mask)."""
        base = self.base
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        positions = positions_from_mask(mask).to(base.device)
        a = self.adapter
        if a is not None and a.inside:  # the deltas act inside the base's own forward
            sites = serving_sites(base)
            bind_rows(sites, [(a.carryon, list(range(input_ids.shape[0])),
                                          [a.alpha if alpha is None else alpha] * input_ids.shape[0])], base.device)
            try:
                x = base.hidden_states(input_ids, mask, [], position_ids=positions)[0][0]
            finally:
                unbind(sites)
            return F.linear(x, base.head_weight, base.head_bias)
        shallow = a.shallow if a else []
        states = [b.hidden_states(input_ids, mask, shallow, position_ids=positions)[0] for b in self.bases[: a.num_bases if a else 1]]
        x = states[0][0]
        if a is None:
            return F.linear(x, base.head_weight, base.head_bias)
        sources = [[br.roundtrip(s) for br, s in zip(brs, st)] for brs, st in zip(a.bridges, states)]
        out = a.carryon(sources, residual=x, positions=positions, key_mask=mask.to(base.device), alpha=alpha)
        return a.carryon.logits(out, alpha)

    def generate(self, prompts: list[list[int]] | torch.Tensor, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, alpha: float | None = None,
                 stop_at_eos: bool = True) -> list[list[int]]:
        """New token ids for each prompt (greedy when temperature == 0), through the decode engine.
        With a seed, row i samples with seed + i (rows are independent)."""
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        seeds = [None if seed is None else seed + i for i in range(len(prompts))]
        return generate_mixed(self.bases, prompts, [self.adapter] * len(prompts), max_new_tokens, temperature, top_p,
                              seeds, [alpha] * len(prompts), stop_at_eos)
