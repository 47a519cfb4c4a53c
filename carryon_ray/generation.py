"""Base + carry-on as one language model: logits and KV-cached generation.

Each new token costs one base decoder step (its KV cache) plus one carry-on step (a transformer
carry-on keeps its own KV cache; an MLP carry-on is position-wise and needs none). The carry-on
reads bridge-roundtripped states, exactly what it saw in training; the residual it corrects is
the base's exact final state, so alpha = 0 gives the base's logits bit for bit.
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
from .model import CarryOn, InheritedHead


@dataclass
class DecodeState:
    """What one decoding step hands to the next."""

    attention_mask: torch.Tensor  # [B, S] 1 = real token (left padding allowed)
    base_caches: list  # one HF cache per base
    carry_caches: list | None  # CarryOn caches (per stage)


class CarryOnModel:
    """A frozen base (or several) plus an optional carry-on adapter."""

    def __init__(self, bases: list[FrozenBase], carryon: CarryOn | None = None,
                 bridges: Bridges | Bridge | None = None, shallow: list[int] | tuple[int, ...] = (),
                 config: dict | None = None):
        self.bases = bases
        self.carryon = carryon.to(bases[0].device) if carryon is not None else None
        self.shallow = list(shallow)
        if bridges is None or isinstance(bridges, Bridge):  # one bridge for every stream
            one = bridges or Bridge(0)
            bridges = [[one] * (1 + len(self.shallow)) for _ in bases]
        self.bridges = bridges
        self.config = config or {}

    @property
    def base(self) -> FrozenBase:
        return self.bases[0]

    @property
    def tokenizer(self):
        return self.base.tokenizer

    @classmethod
    def from_pretrained(cls, base: FrozenBase | str | BaseModelConfig | list, adapter_dir: str | Path | None = None):
        """Load the base(s) if needed and attach the adapter (checked against their fingerprints).

        `adapter_dir` is a directory or an MLflow URI such as models:/NAME@ALIAS.
        """
        bases = base if isinstance(base, list) else [base]
        bases = [b if isinstance(b, FrozenBase) else FrozenBase.load(b) for b in bases]
        if adapter_dir is None:
            return cls(bases)
        adapter_dir = resolve_adapter(adapter_dir)
        carryon, bridges, cfg = load_adapter(
            adapter_dir, [b.fingerprint().to_dict() for b in bases], bases[0].head_weight, bases[0].head_bias
        )
        return cls(bases, carryon, bridges, cfg["shallow"], cfg)

    # -- one step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor, state: DecodeState | None = None, alpha: float | None = None,
             last_only: bool = True, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, DecodeState]:
        """Feed `input_ids` [B, T] (a prompt, or one new token per row); return logits and state.

        `attention_mask` marks real tokens among those fed (left padding); default all ones.
        """
        device = self.base.device
        input_ids = input_ids.to(device)
        B, T = input_ids.shape
        new_mask = torch.ones(B, T, dtype=torch.long) if attention_mask is None else attention_mask
        new_mask = new_mask.to(device)
        if state is None:
            state = DecodeState(new_mask, [None] * len(self.bases), None)
        else:
            state.attention_mask = torch.cat([state.attention_mask, new_mask], 1)
        mask = state.attention_mask
        positions = positions_from_mask(mask)[:, -T:]
        all_states = []
        for i, b in enumerate(self.bases):
            states, state.base_caches[i] = b.hidden_states(
                input_ids, mask, self.shallow, past_key_values=state.base_caches[i], position_ids=positions, use_cache=True
            )
            all_states.append(states)
        x = all_states[0][0]
        if self.carryon is None:
            x = x[:, -1:] if last_only else x
            return F.linear(x, self.base.head_weight, self.base.head_bias), state
        sources = [[br.roundtrip(s) for br, s in zip(brs, states)] for brs, states in zip(self.bridges, all_states)]
        out, state.carry_caches = self.carryon(
            sources, residual=x, positions=positions, key_mask=mask, caches=state.carry_caches, alpha=alpha
        )
        if last_only:
            out = out[:, -1:]
        return self.carryon.logits(out), state

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, alpha: float | None = None):
        """Full-sequence logits [B, T, V] of base + carry-on (no cache kept)."""
        return self.step(input_ids, None, alpha, last_only=False, attention_mask=attention_mask)[0]

    # -- generation -----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: list[list[int]] | torch.Tensor, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, alpha: float | None = None, use_cache: bool = True,
                 stop_at_eos: bool = True) -> list[list[int]]:
        """New token ids for each prompt (greedy when temperature == 0).

        Prompts of different lengths are left-padded. use_cache=False recomputes the whole
        sequence at every step (the reference the KV-cached path must match).
        """
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        pad = self.tokenizer.pad_token_id
        eos = self.tokenizer.eos_token_id
        T = max(len(p) for p in prompts)
        seq = torch.tensor([[pad] * (T - len(p)) + list(p) for p in prompts])
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(seed)
        out: list[list[int]] = [[] for _ in prompts]
        done = torch.zeros(len(prompts), dtype=torch.bool)
        logits, state = self.step(seq, None, alpha, attention_mask=mask)
        for n in range(max_new_tokens):
            nxt = sample(logits[:, -1].float().cpu(), temperature, top_p, gen)
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    out[i].append(t)
                    done[i] = stop_at_eos and t == eos
            if bool(done.all()) or n + 1 == max_new_tokens:
                break
            if use_cache:
                logits, state = self.step(nxt[:, None], state, alpha)
            else:
                seq = torch.cat([seq, nxt[:, None]], 1)
                mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], 1)
                logits, _ = self.step(seq, None, alpha, attention_mask=mask)
        return out


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """Next token per row: argmax at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=gen).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# Many adapters, one base: the base runs once per decoding step for every row of a batch, then
# each group of rows gets its own carry-on. This is where carry-ons beat multi-LoRA serving: the
# base computation is identical for every user.
# ---------------------------------------------------------------------------------------------


@dataclass
class Adapter:
    """One loaded carry-on adapter over a shared base."""

    carryon: CarryOn
    bridges: Bridges
    shallow: list[int]
    config: dict

    @classmethod
    def load(cls, bases: FrozenBase | list[FrozenBase], ref: str | Path) -> "Adapter":
        """Load `ref` for the first len(its fingerprints) of `bases` (base 0 first: mixed-base
        adapters need the same bases in the same order, checked by fingerprint)."""
        bases = bases if isinstance(bases, list) else [bases]
        path = resolve_adapter(ref)
        n = len(read_adapter_config(path).get("fingerprints", [])) or 1
        if n > len(bases):
            raise AdapterError(f"{path}: adapter mixes {n} bases; this server holds {len(bases)}")
        base = bases[0]
        carryon, bridges, cfg = load_adapter(path, [b.fingerprint().to_dict() for b in bases[:n]],
                                             base.head_weight, base.head_bias)
        return cls(carryon.to(base.device), bridges, list(cfg["shallow"]), cfg)

    @property
    def num_bases(self) -> int:
        return len(self.bridges)


@torch.inference_mode()
def generate_mixed(bases: FrozenBase | list[FrozenBase], prompts: list[list[int]], adapters: list[Adapter | None],
                   max_new_tokens: list[int] | int = 64, temperature: list[float] | float = 0.0,
                   top_p: list[float] | float = 1.0, seeds: list[int | None] | None = None,
                   alphas: list[float | None] | None = None, stop_at_eos: bool = True,
                   on_token=None) -> list[list[int]]:
    """Generate for rows that may each use a different adapter (None = the bare base).

    Per decoding step: one base forward for the whole batch (its KV cache shared), then one
    carry-on forward per distinct adapter over its rows (each with its own KV cache). `bases`
    beyond the first (model mixing) also run once per step for the whole batch when an adapter in
    it mixes them. Greedy output for a row equals `CarryOnModel.generate` with that row's adapter
    alone. `on_token(row, token)` is called as tokens are produced (streaming); when it returns
    True that row stops (e.g. a stop string was completed).
    """
    n = len(prompts)
    per = lambda v, d=None: list(v) if isinstance(v, (list, tuple)) else [v if v is not None else d] * n  # noqa: E731
    max_new, temps, tops = per(max_new_tokens), per(temperature), per(top_p)
    seeds, alphas = per(seeds), per(alphas)
    gens = []
    for s in seeds:
        g = torch.Generator(device="cpu")
        if s is not None:
            g.manual_seed(s)
        gens.append(g)
    bases = bases if isinstance(bases, list) else [bases]
    base = bases[0]
    n_bases = max([1] + [a.num_bases for a in adapters if a is not None])
    device = base.device
    pad, eos = base.tokenizer.pad_token_id, base.tokenizer.eos_token_id
    # Rows sharing an adapter (and an alpha) form one carry-on group.
    groups: dict[tuple, list[int]] = {}
    for i, (a, al) in enumerate(zip(adapters, alphas)):
        groups.setdefault((id(a) if a is not None else None, al), []).append(i)
    shallow = sorted({k for a in adapters if a is not None for k in a.shallow})
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (T - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts]).to(device)
    base_caches, carry_caches = [None] * n_bases, {key: None for key in groups}
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * n
    feed = ids
    for _step in range(max(max_new)):
        Tn = feed.shape[1]
        positions = positions_from_mask(mask)[:, -Tn:]
        all_states = []
        for b in range(n_bases):  # every base once per step for the whole batch
            st, base_caches[b] = bases[b].hidden_states(feed.to(device), mask, shallow, past_key_values=base_caches[b],
                                                        position_ids=positions, use_cache=True)
            all_states.append(st)
        states = all_states[0]
        x = states[0]
        logits = torch.empty(n, base.vocab_size, dtype=torch.float32)
        # Rows whose head is the base's own (bare base, inherited-head adapters) share one head
        # projection: the vocabulary matmul is the largest per-step cost after the base itself.
        shared_rows, shared_x = [], []
        for key, rows in groups.items():
            a = adapters[rows[0]]
            r = torch.tensor(rows, device=device)
            if a is None:
                shared_rows += rows
                shared_x.append(x[r, -1])
                continue
            srcs = [[br.roundtrip(s[r]) for br, s in zip(brs, [st[0]] + [st[1 + shallow.index(k)] for k in a.shallow])]
                    for brs, st in zip(a.bridges, all_states)]
            res, carry_caches[key] = a.carryon(srcs, residual=x[r], positions=positions[r], key_mask=mask[r],
                                               caches=carry_caches[key], alpha=key[1])
            if isinstance(a.carryon.head, InheritedHead) and a.carryon.head.weight is base.head_weight:
                shared_rows += rows
                shared_x.append(res[:, -1].to(base.head_weight.dtype))
            else:
                logits[rows] = a.carryon.logits(res[:, -1]).float().cpu()
        if shared_rows:
            logits[shared_rows] = F.linear(torch.cat(shared_x), base.head_weight, base.head_bias).float().cpu()
        nxt = torch.zeros(n, dtype=torch.long)
        for i in range(n):
            nxt[i] = sample(logits[i : i + 1], temps[i], tops[i], gens[i])[0]
            if not done[i]:
                out[i].append(int(nxt[i]))
                stop = on_token(i, int(nxt[i])) if on_token is not None else False
                done[i] = bool(stop) or (stop_at_eos and int(nxt[i]) == eos) or len(out[i]) >= max_new[i]
        if all(done):
            break
        feed = nxt[:, None]
        mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype, device=device)], 1)
    return out
