"""The recycled-top carry-on: the base's own top k blocks, adapted through low-rank deltas.

A carry-on on the final state can only re-read what the base kept there; what a task needs the
base's attention to recompute is gone by then (every head-side shape we measured stopped at
~0.73x of LoRA's gain). This kind goes one step down instead. One base forward caches h, the
state entering block L - k; the carry-on is a frozen copy of blocks L-k .. L-1, the final norm and
the head, with a low-rank delta on each target linear layer:

    W x   ->   W x + alpha * B (A x)         A: r x in, B: out x r, B = 0 at the start
    y     =    head(norm(blocks_{L-k..L-1}(h)))

alpha scales every delta and is chosen on validation data like any carry-on's alpha. At alpha = 0
the delta is skipped (not multiplied by zero), so the output is the base's bit for bit.

Training runs the copied blocks as Hugging Face's own modules (a model of k blocks built from the
base's config, fed the cached state as `inputs_embeds`), so the partial forward is the base's
forward. Serving never copies anything: `serving_sites` wraps the base's own linear layers once,
and each forward binds every row's deltas (its adapter's A and B, its alpha) to them, applied as
one matmul pair per layer for every adapted row of every adapter (`RowDeltas`: the adapters'
ranks stacked, each row scaled on its own columns) while base rows pass untouched.

An adapter holds only A, B and alpha (safetensors); carryon_ray/export.py writes the same numbers as
a standard PEFT LoRA (lora_alpha folding alpha), so peft, vLLM multi-LoRA and Ray Serve LLM load it.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ArchConfig, HeadConfig
from .model import InheritedHead

# Where each target sits inside a Llama-style decoder block (the names PEFT's target_modules use).
TARGET_PATHS = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
                "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
                "down_proj": "mlp.down_proj"}


def add_delta(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float) -> torch.Tensor:
    """y + alpha * B (A x): one adapter's low-rank delta on every row of x ([N, ..., in]), as training
    runs it (A [r, in], B [out, r]). Serving applies many adapters' deltas to their own rows at once
    (`RowDeltas`); both are the same W x + alpha B A x."""
    return y + alpha * F.linear(F.linear(x, A), B)


@dataclass
class RowDeltas:
    """The deltas of several adapters on their own rows of one forward, as ONE matmul pair per layer.

    The adapters' A are stacked along the rank (A [R, in], R = the sum of their ranks) and their B side
    by side (B [out, R]); `scale` [n, R] holds, for each adapted row, its alpha on its own adapter's
    rank columns and zeros elsewhere, so
        y[rows] += ((x[rows] A^T) * scale) B^T
    is exactly each row's own alpha B A x (the other adapters' columns contribute exact zeros). On a
    CPU this beats one small matmul pair per adapter (S-LoRA/Punica gather per row with custom
    kernels; vLLM pads every adapter to the largest rank). Adapters of any rank and dtype mix freely;
    the scale is applied in fp32 whatever the base's dtype, so a row's alpha never depends on its
    batch-mates. A row of x is a sequence of a padded batch, or one token of the engine's flat batch."""

    A: torch.Tensor
    B: torch.Tensor
    scale: torch.Tensor  # [n, R] float32
    rows: torch.Tensor  # [n]

    def apply(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x.index_select(0, self.rows), self.A.to(x.dtype))  # [n, ..., R]
        scale = self.scale.view(self.scale.shape[0], *[1] * (h.dim() - 2), self.scale.shape[1])
        d = F.linear((h.float() * scale).to(x.dtype), self.B.to(x.dtype))
        return y.index_add(0, self.rows, d.to(y.dtype))


class DeltaLinear(nn.Module):
    """A frozen Linear whose output gets the deltas bound to it for the next forward (none bound:
    exactly the Linear). `bound` is one (A, B, alpha) for every row (training), or a list of
    `RowDeltas` (serving)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self.bound: tuple | list | None = None

    @property
    def weight(self) -> torch.Tensor:  # the Linear's own attributes stay reachable (HF code reads them)
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    def forward(self, x):
        y = self.linear(x)
        if self.bound is None:
            return y
        if isinstance(self.bound, tuple):
            return add_delta(y, x, *self.bound)
        for d in self.bound:
            y = d.apply(y, x)
        return y


_WRAPPING = threading.RLock()


def delta_sites(layers: nn.ModuleList, first: int, targets: list[str]) -> dict[str, DeltaLinear]:
    """Wrap (once) the target linear layers of blocks `first`.. of a decoder stack; returns them by
    site name '<block>.<target>' (the base's own block index). Idempotent and thread-safe."""
    sites = {}
    with _WRAPPING:
        for j in range(first, len(layers)):
            for t in targets:
                parent_path, _, leaf = TARGET_PATHS[t].rpartition(".")
                parent = layers[j].get_submodule(parent_path)
                lin = getattr(parent, leaf)
                if not isinstance(lin, DeltaLinear):
                    lin = DeltaLinear(lin)
                    setattr(parent, leaf, lin)
                sites[f"{j}.{t}"] = lin
    return sites


def serving_sites(base) -> dict[str, DeltaLinear]:
    """Every target linear layer of every block of a served base, wrapped the first time this is called
    for the base (an engine calls it when it starts) and never changed after: adapters loaded later
    find their sites there, so loading one never mutates the base under a running step. Empty for a
    base whose blocks are not Llama-style (no recycled-top adapter can run on it)."""
    with _WRAPPING:
        if base.delta_sites is None:
            layers = getattr(getattr(base.model, "model", None), "layers", None)
            llama = layers is not None and all(_has(b, path) for b in layers for path in TARGET_PATHS.values())
            base.delta_sites = delta_sites(layers, 0, list(TARGET_PATHS)) if llama else {}
        return base.delta_sites


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


class LowRank(nn.Module):
    """One trainable delta B A for a linear layer of shape [out, in]; B = 0, so it starts as no change."""

    def __init__(self, out_f: int, in_f: int, rank: int):
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, in_f) / math.sqrt(in_f))
        self.B = nn.Parameter(torch.zeros(out_f, rank))


class RecycledTop(nn.Module):
    """The recycled-top carry-on: deltas for the top `depth` blocks of a base, alpha, and the base's head.

    `blocks` (training only) is a Hugging Face model of `depth` decoder blocks and the final norm, with
    the base's weights, frozen; adapters loaded for serving have none (the base's own blocks run).
    It speaks the carry-on interface the trainer and the engine use (forward, logits, alphas, stages)."""

    uses_cache = False  # served inside the base's forward, on the base's own KV cache
    correction = None

    def __init__(self, arch: ArchConfig, head: HeadConfig, dims: list[list[int]], vocab_size: int, num_layers: int,
                 shapes: dict[str, tuple[int, int]], head_weight=None, head_bias=None, alpha: float = 1.0,
                 blocks: nn.Module | None = None):
        super().__init__()
        self.arch, self.head_cfg, self.dims, self.vocab_size = arch, head, dims, vocab_size
        self.fusion_mode = "average"
        self.num_layers, self.first = num_layers, num_layers - arch.depth
        self.shapes = dict(shapes)  # target -> (out, in)
        # deltas[j][target]: block first + j. ModuleDicts keep the file's keys readable.
        self.deltas = nn.ModuleList(
            nn.ModuleDict({t: LowRank(*self.shapes[t], arch.rank) for t in arch.targets}) for _ in range(arch.depth))
        self.register_buffer("alphas", torch.tensor([float(alpha)]))
        self.head = InheritedHead(head_weight, head_bias)
        self._blocks = [blocks] if blocks is not None else []  # not a submodule: never in the adapter file
        self._sites = delta_sites(blocks.layers, 0, arch.targets) if blocks is not None else {}

    # -- the carry-on interface -------------------------------------------------------------------
    @property
    def stages(self) -> list[nn.Module]:
        return [self.deltas]

    @property
    def alpha(self) -> float:
        return float(self.alphas[-1])

    def set_alpha(self, alpha: float, stage: int = -1) -> None:
        self.alphas[-1] = float(alpha)

    def freeze_earlier_stages(self) -> None:
        self.deltas.requires_grad_(True)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters())

    def balance_loss(self) -> torch.Tensor:
        return torch.zeros(())

    def set_router_dropout(self, p: float, seed: int = 0) -> None:
        pass

    def expert_usage(self, reset: bool = True) -> list[list[float]]:
        return []

    def pairs(self):
        """(site name '<base block>.<target>', LowRank) for every delta."""
        for j, per in enumerate(self.deltas):
            for t, lr in per.items():
                yield f"{self.first + j}.{t}", lr

    def _apply(self, fn, recurse=True):  # .to() / .float() move the frozen blocks too
        super()._apply(fn, recurse)
        for b in self._blocks:
            b._apply(fn, recurse)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        for b in self._blocks:
            b.train(mode)
        return self

    # -- the forward --------------------------------------------------------------------------------
    def forward(self, sources, residual=None, positions=None, key_mask=None, cache=None, attn_mask=None, alpha=None):
        """The final state (after the base's norm) of the copied blocks run on the cached state
        sources[0][0] (the state entering block L - depth), every delta scaled by `alpha` (default:
        the chosen one). Padding is on the right and attention causal, so `key_mask` is not needed;
        packed batches pass their `positions` and 4D `attn_mask`."""
        if not self._blocks:
            raise RuntimeError("this recycled carry-on was loaded for serving: it runs inside the base's forward "
                               "(generation.Engine), not on cached states")
        blocks = self._blocks[0]
        a = self.alphas[-1] if alpha is None else alpha
        a = float(a) if not isinstance(a, torch.Tensor) or a.dim() == 0 else a
        if isinstance(a, torch.Tensor):
            raise ValueError("the recycled carry-on trains and scores at one alpha per forward")
        h = sources[0][0].to(blocks.norm.weight.dtype)
        # At alpha 0 the deltas are skipped (the base bit for bit), except when training them: then they
        # stay in the graph at scale 0, so the step has a (zero) gradient instead of no graph at all.
        skip = a == 0 and not (torch.is_grad_enabled() and any(p.requires_grad for p in self.deltas.parameters()))
        for j, per in enumerate(self.deltas):
            for t, lr in per.items():
                self._sites[f"{j}.{t}"].bound = None if skip else (lr.A, lr.B, a)
        try:
            if attn_mask is not None:
                from .base import hf_mask

                attn_mask = hf_mask(blocks.config, attn_mask, h.dtype)
            out = blocks(inputs_embeds=h, position_ids=positions, attention_mask=attn_mask, use_cache=False)
        finally:
            for site in self._sites.values():
                site.bound = None
        return out.last_hidden_state

    def states_at(self, sources, alphas: list[float], **kw):
        """(alpha, final state) for each candidate alpha: one forward each (alpha is inside the blocks)."""
        for a in alphas:
            yield a, self.forward(sources, alpha=a, **kw)

    def base_state(self, sources, positions=None, attn_mask=None) -> torch.Tensor:
        """The base's own final state for these cached states (the replay KL's reference)."""
        with torch.no_grad():
            return self.forward(sources, positions=positions, attn_mask=attn_mask, alpha=0.0)

    def logits(self, x: torch.Tensor, alpha=None) -> torch.Tensor:
        return self.head(x)


# ---------------------------------------------------------------------------------------------
# Serving: deltas bound to the base's own blocks for one forward.
# ---------------------------------------------------------------------------------------------


# At most this many stacked rank columns per matmul pair: every adapted row is multiplied by all of
# them, so a step with many adapters splits them into blocks (64 rank-8 adapters: 2 blocks of 256).
BLOCK_RANK = 256


class StackCache:
    """The stacked A and B of recent adapter compositions, per site (a composition repeats for many
    steps while the same users decode), least recently used first out past `max_bytes`. Holds its
    adapters in its keys, so no key outlives them; the engine clears it when it goes idle."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes, self.nbytes = max_bytes, 0
        self.entries: OrderedDict = OrderedDict()

    def get(self, adapters: tuple, site: str, build):
        key = (adapters, site)
        hit = self.entries.get(key)
        if hit is not None:
            self.entries.move_to_end(key)
            return hit
        hit = self.entries[key] = build()
        self.nbytes += sum(t.numel() * t.element_size() for t in hit)
        while self.nbytes > self.max_bytes and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.nbytes -= sum(t.numel() * t.element_size() for t in old)
        return hit

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0


def bind_rows(sites: dict[str, DeltaLinear], groups: list[tuple[RecycledTop, list[int], list[float]]],
              device=None, cache: StackCache | None = None) -> None:
    """Bind every group's deltas (adapter, its rows of the next forward's input, their alphas) to the
    base's sites as `RowDeltas`: per site, one matmul pair for every adapted row of every adapter
    (in blocks of at most BLOCK_RANK rank columns). Rows at alpha 0 are left out (the base, bit for
    bit). `unbind` after the forward."""
    rows_of: dict[RecycledTop, tuple[list[int], list[float]]] = {}
    for adapter, rows, alphas in groups:
        rs, als = rows_of.setdefault(adapter, ([], []))
        for r, a in zip(rows, alphas):
            if a != 0:
                rs.append(r)
                als.append(float(a))
    adapters = sorted((a for a, (rs, _) in rows_of.items() if rs), key=id)  # one order: cache hits
    blocks, width = [], BLOCK_RANK
    for a in adapters:
        if width + a.arch.rank > BLOCK_RANK:
            blocks.append([])
            width = 0
        blocks[-1].append(a)
        width += a.arch.rank
    pairs = {a: dict(a.pairs()) for a in adapters}
    per_site: dict[str, list[RowDeltas]] = {}
    for block in blocks:
        plans: dict[tuple, tuple] = {}  # members -> (scale, rows): adapters of other depths share some sites only
        for name in sorted({n for a in block for n in pairs[a]}):
            members = tuple(a for a in block if name in pairs[a])
            if members not in plans:
                plans[members] = _scale_and_rows(members, rows_of, device)
            scale, rows = plans[members]

            def stack(members=members, name=name):
                return (torch.cat([pairs[a][name].A for a in members]),
                        torch.cat([pairs[a][name].B for a in members], dim=1))

            A, B = cache.get(members, name, stack) if cache is not None else stack()
            per_site.setdefault(name, []).append(RowDeltas(A, B, scale, rows))
    for name, bound in per_site.items():
        sites[name].bound = bound


def _scale_and_rows(members, rows_of, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, R] fp32: each adapted row's alpha on its own adapter's rank columns; and the rows [n]."""
    rows = [r for a in members for r in rows_of[a][0]]
    scale = torch.zeros(len(rows), sum(a.arch.rank for a in members))
    i = col = 0
    for a in members:
        rs, als = rows_of[a]
        scale[i : i + len(rs), col : col + a.arch.rank] = torch.tensor(als)[:, None]
        i, col = i + len(rs), col + a.arch.rank
    return scale.to(device), torch.tensor(rows, device=device)


def unbind(sites: dict[str, DeltaLinear]) -> None:
    for site in sites.values():
        site.bound = None


# ---------------------------------------------------------------------------------------------
# Building: from the base's checkpoint (training) or from an adapter file (serving).
# ---------------------------------------------------------------------------------------------


def top_blocks_model(path: str, conf: dict, weights: dict[str, torch.Tensor], depth: int, dtype: torch.dtype):
    """A Hugging Face decoder of `depth` blocks and the final norm with the base's weights, frozen (its
    vocabulary shrunk to one row: it is fed states, never token ids)."""
    from transformers import AutoConfig, AutoModel

    hf = AutoConfig.from_pretrained(path)
    hf.num_hidden_layers = depth
    if getattr(hf, "layer_types", None):
        hf.layer_types = list(hf.layer_types)[-depth:]
    hf.vocab_size, hf.pad_token_id = 1, None
    model = AutoModel.from_config(hf, dtype=dtype)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=False)
    missing = [k for k in missing if not k.startswith("embed_tokens.")]
    if missing or unexpected:
        raise ValueError(f"{path}: the top blocks do not fit a {type(model).__name__} of {depth} blocks "
                         f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    model.embed_tokens = None
    return model.eval().requires_grad_(False)


def target_shapes(weights: dict[str, torch.Tensor], targets: list[str]) -> dict[str, tuple[int, int]]:
    """(out, in) of each target linear layer, from block 0 of the copied weights."""
    return {t: tuple(weights[f"layers.0.{TARGET_PATHS[t]}.weight"].shape) for t in targets}


def build_recycled(cfg, head_weight=None, head_bias=None, dtype: torch.dtype = torch.float32) -> RecycledTop:
    """The recycled-top carry-on of `cfg` for training: the base's top carryon.depth blocks (read from its
    safetensors files, nothing else of the base) with fresh deltas."""
    from .base import load_top_blocks

    arch = cfg.carryon
    path, conf, weights = load_top_blocks(cfg.base, arch.depth)
    blocks = top_blocks_model(path, conf, weights, arch.depth, dtype)
    hidden = int(conf["hidden_size"])
    model = RecycledTop(arch, cfg.head, [[hidden]], int(conf["vocab_size"]), int(conf["num_hidden_layers"]),
                        target_shapes(weights, arch.targets), head_weight, head_bias, cfg.alpha.init, blocks)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def recycled_from_state(arch: ArchConfig, head: HeadConfig, cfg: dict, tensors: dict[str, torch.Tensor],
                        head_weight=None, head_bias=None) -> RecycledTop:
    """A served recycled carry-on from an adapter's config and tensors (deltas only)."""
    shapes = {t: (int(tensors[f"deltas.0.{t}.B"].shape[0]), int(tensors[f"deltas.0.{t}.A"].shape[1]))
              for t in arch.targets}
    model = RecycledTop(arch, head, cfg["dims"], cfg["vocab_size"], int(cfg["num_layers"]), shapes, head_weight,
                        head_bias, cfg["alphas"][-1])
    return model
