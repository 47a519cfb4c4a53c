"""The carry-on network (GPT Carry-On, arXiv 2504.07513), in one file, top to bottom.

A frozen base LLM gives, for every token, its final hidden state x (after the final norm, so
W_out @ x are the base logits) and optionally shallow-layer states. The carry-on adds a learned
correction to the residual stream and reuses a head to predict the next token:

    dx      = g(s) * f(s)              f and sigmoid-gate g share one trunk; s = fused sources
    y(a)    = W_pred (x + a * dx)      a (alpha) >= 0 is chosen on validation data, never trained
            [+ a * U V (x + a * dx)    an optional low-rank head correction, `head.rank`]

Stages stack (boosting / growing in depth): x_t = x_{t-1} + a_t * dx_t(x_{t-1}); only the newest
stage trains. With the inherited head and a = 0, y is the base's logits bit for bit.

This module knows nothing about clusters, data or files: `CarryOn.forward` is the one carry-on
forward used by training (jobs) and serving alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ArchConfig, HeadConfig

# ---------------------------------------------------------------------------------------------
# Transformer parts (used by the 'transformer' trunk): RMSNorm, RoPE, GQA attention, SwiGLU.
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, T, head_dim/2] for integer positions [B, T]."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    ang = positions.float()[..., None] * inv
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, hd]; rotate pairs (first half, second half) as Llama does.
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def attend(q, k, v, key_mask=None, attn_mask=None):
    """Causal attention of the T queries over their sequence's keys.

    Without a cache the keys are the queries' own positions, and `key_mask` ([B, S], 1 = real)
    hides padding. With a KV cache the decode engine passes `attn_mask` itself ([B, 1, T, S] bool,
    True = may attend): each row's queries sit at their own positions inside the cache."""
    if attn_mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    T, S = q.shape[2], k.shape[2]
    if key_mask is None and S == T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None, None]
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :S].bool()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads and an optional KV cache."""

    layer_id = 0  # this layer's index in the carry-on's KV cache (set by CarryOn)

    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.heads, self.kv_heads = cfg.heads, cfg.kv_heads
        self.head_dim = cfg.width // cfg.heads
        self.theta = cfg.rope_theta
        self.q = nn.Linear(cfg.width, cfg.heads * self.head_dim, bias=False)
        self.kv = nn.Linear(cfg.width, 2 * cfg.kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(cfg.heads * self.head_dim, cfg.width, bias=False)

    def forward(self, h, positions, key_mask=None, cache=None, attn_mask=None):
        B, T, _ = h.shape
        q = self.q(h).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(h).view(B, T, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        cos, sin = rope(positions, self.head_dim, self.theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # store this step's keys/values; get every cached position back
            k, v = cache.update(k, v, self.layer_id)
        rep = self.heads // self.kv_heads
        out = attend(q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), key_mask, attn_mask)
        return self.o(out.transpose(1, 2).reshape(B, T, -1))


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3 style).

    Keys and values are expanded from one shared low-rank latent c = W_dkv h, so the cache holds
    c (kv_rank numbers per token) plus one shared RoPE key, not 2 x heads x head_dim. Each head's
    query and key have a position-free part (from the latents) and a RoPE part: RoPE cannot be
    applied to the latent itself because rotation does not commute with the up-projection.
    Queries may be low-rank too (q_rank)."""

    layer_id = 0  # this layer's index in the carry-on's KV cache (set by CarryOn)

    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.heads, self.head_dim, self.rope_dim = cfg.heads, cfg.width // cfg.heads, cfg.rope_dim
        self.kv_rank, self.theta = cfg.kv_rank, cfg.rope_theta
        q_in = cfg.q_rank or cfg.width
        self.q_down = nn.Linear(cfg.width, cfg.q_rank, bias=False) if cfg.q_rank else None
        self.q_norm = RMSNorm(cfg.q_rank, cfg.norm_eps) if cfg.q_rank else None
        self.q_up = nn.Linear(q_in, cfg.heads * (self.head_dim + self.rope_dim), bias=False)
        self.kv_down = nn.Linear(cfg.width, cfg.kv_rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_rank, cfg.norm_eps)
        self.kv_up = nn.Linear(cfg.kv_rank, cfg.heads * 2 * self.head_dim, bias=False)
        self.o = nn.Linear(cfg.heads * self.head_dim, cfg.width, bias=False)

    def forward(self, h, positions, key_mask=None, cache=None, attn_mask=None):
        B, T, _ = h.shape
        H, hd, dr = self.heads, self.head_dim, self.rope_dim
        q = self.q_up(self.q_norm(self.q_down(h)) if self.q_down is not None else h)
        q_pos_free, q_rope = q.view(B, T, H, hd + dr).transpose(1, 2).split([hd, dr], dim=-1)
        latent, k_rope = self.kv_down(h).split([self.kv_rank, dr], dim=-1)
        latent = self.kv_norm(latent)[:, None]  # [B, 1, T, r]: the sequence on dim 2, like k/v caches
        cos, sin = rope(positions, dr, self.theta)
        q_rope, k_rope = apply_rope(q_rope, cos, sin), apply_rope(k_rope[:, None], cos, sin)
        if cache is not None:  # the cache holds the latent and the shared RoPE key, not k and v
            latent, k_rope = cache.update(latent, k_rope, self.layer_id)
        S = latent.shape[2]
        k_pos_free, v = self.kv_up(latent[:, 0]).view(B, S, H, 2 * hd).transpose(1, 2).split([hd, hd], dim=-1)
        q = torch.cat([q_pos_free, q_rope], dim=-1)
        k = torch.cat([k_pos_free, k_rope.expand(B, H, S, dr)], dim=-1)
        out = attend(q, k, v, key_mask, attn_mask)
        return self.o(out.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, width: int, ratio: float, hidden: int | None = None):
        super().__init__()
        hidden = hidden or int(math.ceil(width * ratio / 8) * 8)
        self.up = nn.Linear(width, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, h):
        a, b = self.up(h).chunk(2, dim=-1)
        return self.down(F.silu(a) * b)


class MoE(nn.Module):
    """Routed SwiGLU experts (plus optional shared ones) with top-k routing.

    Each token's router scores all experts (softmax); the top_k are run and mixed with their
    renormalised scores. During training a router dropout hides each expert from each token with
    probability `router_dropout` (set from outside and decayed over the run), so early tokens try
    experts they would not pick yet. The hidden experts are drawn from `noise_seed` (set with the
    dropout, from the run's seed, step, rank and the layer), never from the process's global
    stream: fits that share a process (the trainer service's threads) cannot draw from each
    other's stream, and a run resumed from a checkpoint hides the same experts at the same step as
    the run that was never stopped. `balance_loss` (Switch Transformer form, E * sum f_i P_i) is
    kept from the last forward for the trainer to add; `usage` counts routed slots per expert
    until `reset_usage`."""

    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.top_k = cfg.top_k
        self.router = nn.Linear(cfg.width, cfg.experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(cfg.width, cfg.expert_ratio) for _ in range(cfg.experts))
        self.shared = nn.ModuleList(SwiGLU(cfg.width, cfg.expert_ratio) for _ in range(cfg.shared_experts))
        self.router_dropout = float(cfg.router_dropout[0])
        self.noise_seed = 0
        self.balance_loss = torch.zeros(())
        self.register_buffer("usage", torch.zeros(cfg.experts), persistent=False)

    def reset_usage(self) -> None:
        self.usage.zero_()

    def forward(self, h, key_mask=None):
        B, T, D = h.shape
        flat = h.reshape(-1, D)
        probs = F.softmax(self.router(flat).float(), dim=-1)  # [N, E]
        scores = probs
        if self.training and self.router_dropout > 0:
            noise = torch.Generator(device=probs.device).manual_seed(self.noise_seed)
            hide = torch.rand(probs.shape, generator=noise, device=probs.device) < self.router_dropout
            hide &= ~torch.eye(probs.shape[1], dtype=torch.bool, device=h.device)[probs.argmax(-1)]  # keep the top one
            scores = probs.masked_fill(hide, 0.0)
        weight, chosen = scores.topk(self.top_k, dim=-1)  # [N, k]
        weight = (weight / weight.sum(-1, keepdim=True).clamp_min(1e-9)).to(h.dtype)
        valid = torch.ones(B * T, dtype=torch.bool, device=h.device) if key_mask is None \
            else key_mask[:, -T:].reshape(-1).bool()
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, expert(flat[rows]) * weight[rows, slot, None])
        for expert in self.shared:
            out = out + expert(flat)
        # Load balance over real tokens: f_i = share of routed slots, P_i = mean router probability.
        E = probs.shape[1]
        counts = torch.zeros(E, device=h.device).index_add_(
            0, chosen[valid].reshape(-1), torch.ones(int(valid.sum()) * self.top_k, device=h.device))
        f = counts / counts.sum().clamp_min(1.0)
        self.balance_loss = E * (f * probs[valid].mean(0)).sum() if valid.any() else probs.sum() * 0
        self.usage += counts.detach()
        return out.view(B, T, D)


class Block(nn.Module):
    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.width, cfg.norm_eps)
        self.attn = LatentAttention(cfg) if cfg.attention == "mla" else Attention(cfg)
        self.norm2 = RMSNorm(cfg.width, cfg.norm_eps)
        self.moe = cfg.experts > 0
        self.mlp = MoE(cfg) if self.moe else SwiGLU(cfg.width, cfg.mlp_ratio, cfg.mlp_hidden)

    def forward(self, h, positions, key_mask=None, cache=None, attn_mask=None):
        h = h + self.attn(self.norm1(h), positions, key_mask, cache, attn_mask)
        m = self.mlp(self.norm2(h), key_mask) if self.moe else self.mlp(self.norm2(h))
        return h + m


# ---------------------------------------------------------------------------------------------
# Low-rank deltas on frozen weights (growing's optional LoRA phase on earlier stages).
# (The recycled-top carry-on, the base's own top blocks with deltas, lives in recycled.py.)
# ---------------------------------------------------------------------------------------------


class LowRankDelta(nn.Module):
    """y = x (W + B A)^T with W a frozen copy of a base weight. B starts at zero, so the layer
    starts as exactly W; only A and B train; `folded` turns it back into one plain Linear."""

    def __init__(self, weight: torch.Tensor, rank: int, bias: torch.Tensor | None = None):
        super().__init__()
        out_f, in_f = weight.shape
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.weight.frozen_copy = True  # freeze_earlier_stages must not thaw it
        self.bias = None
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
            self.bias.frozen_copy = True
        self.A = nn.Parameter(torch.randn(rank, in_f, dtype=weight.dtype) / math.sqrt(in_f))
        self.B = nn.Parameter(torch.zeros(out_f, rank, dtype=weight.dtype))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.A), self.B)

    def folded(self) -> nn.Linear:
        lin = nn.Linear(self.weight.shape[1], self.weight.shape[0], bias=self.bias is not None)
        lin.weight.data = (self.weight + self.B @ self.A).detach().clone()
        if self.bias is not None:
            lin.bias.data = self.bias.detach().clone()
        return lin


def add_deltas(module: nn.Module, rank: int) -> None:
    """Wrap every plain Linear below `module` in a LowRankDelta (growing's optional LoRA phase:
    later stages nudge an earlier stage through low-rank updates while its weights stay put)."""
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            setattr(module, name, LowRankDelta(child.weight, rank, child.bias).to(child.weight.device))
        else:
            add_deltas(child, rank)


def fold_deltas(module: nn.Module) -> None:
    """Replace every LowRankDelta below `module` by its folded plain Linear (in place)."""
    for name, child in list(module.named_children()):
        if isinstance(child, LowRankDelta):
            setattr(module, name, child.folded().to(child.weight.device))
        else:
            fold_deltas(child)


# ---------------------------------------------------------------------------------------------
# Trunks: map the fused input [B, T, d_in] to features [B, T, width] shared by f and g.
# ---------------------------------------------------------------------------------------------


class MLPTrunk(nn.Module):
    """The paper's tiny carry-on: the first of its two linear layers (D -> r), then GELU."""

    def __init__(self, d_in: int, cfg: ArchConfig):
        super().__init__()
        self.inp = nn.Linear(d_in, cfg.width)

    def forward(self, s, positions=None, key_mask=None, cache=None, attn_mask=None):
        return F.gelu(self.inp(s))  # position-wise: no cache needed


class TransformerTrunk(nn.Module):
    """Causal transformer blocks over the token sequence."""

    def __init__(self, d_in: int, cfg: ArchConfig):
        super().__init__()
        self.inp = nn.Linear(d_in, cfg.width, bias=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.width, cfg.norm_eps)

    def forward(self, s, positions, key_mask=None, cache=None, attn_mask=None):
        h = self.inp(s)
        for block in self.blocks:
            h = block(h, positions, key_mask, cache, attn_mask)
        return self.norm(h)


TRUNKS = {"mlp": MLPTrunk, "transformer": TransformerTrunk}


# ---------------------------------------------------------------------------------------------
# Source fusion: deep state + shallow shortcuts, from one or several bases -> one input vector.
# ---------------------------------------------------------------------------------------------


class SourceFusion(nn.Module):
    """Combine sources[b][i] (base b, source i: deep first, then shallow layers).

    'average' (paper: "take 32nd layer and 0th layer and take element-wise average") needs every
    source of a base at the same width; several bases must then share that width too.
    'projection' learns one linear map per (base, source) into `d_out` and averages them.
    """

    def __init__(self, mode: str, dims: list[list[int]], d_out: int):
        super().__init__()
        self.mode = mode
        if mode == "average":
            widths = {d for base in dims for d in base}
            if len(widths) != 1:
                raise ValueError(f"fusion 'average' needs sources of one width, got {sorted(widths)}; use 'projection'")
            self.d_out = widths.pop()
        else:
            self.d_out = d_out
            self.proj = nn.ModuleList(
                nn.ModuleList(nn.Linear(d, d_out, bias=False) for d in base) for base in dims
            )

    def forward(self, sources: list[list[torch.Tensor]]) -> torch.Tensor:
        if self.mode == "average":
            flat = [s for base in sources for s in base]
            return torch.stack(flat).mean(0)
        outs = [p(s) for ps, base in zip(self.proj, sources) for p, s in zip(ps, base)]
        return torch.stack(outs).mean(0)


# ---------------------------------------------------------------------------------------------
# A stage: fusion -> trunk -> (f, g) -> dx.
# ---------------------------------------------------------------------------------------------


class Stage(nn.Module):
    def __init__(self, cfg: ArchConfig, dims: list[list[int]], fusion: str, d_res: int):
        super().__init__()
        self.fusion = SourceFusion(fusion, dims, cfg.width if cfg.kind == "transformer" else dims[0][0])
        self.trunk = TRUNKS[cfg.kind](self.fusion.d_out, cfg)
        # f and g differ only in their last linear layer. Both start at zero: f = 0 makes the
        # untrained carry-on an exact no-op, and g starts at sigmoid(0) = 0.5.
        self.f = nn.Linear(cfg.width, d_res)
        self.g = nn.Linear(cfg.width, d_res) if cfg.gate else None
        for lin in (self.f, self.g):
            if lin is not None:
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    def forward(self, sources, positions=None, key_mask=None, cache=None, attn_mask=None):
        feats = self.trunk(self.fusion(sources), positions, key_mask, cache, attn_mask)
        dx = self.f(feats)
        if self.g is not None:
            dx = torch.sigmoid(self.g(feats)) * dx
        return dx


# ---------------------------------------------------------------------------------------------
# Heads: W_pred.
# ---------------------------------------------------------------------------------------------


class InheritedHead(nn.Module):
    """The base's own output head, frozen. Its weight is a non-persistent buffer: adapters never
    store it, it is re-attached from the base (the tied embedding when the base ties them)."""

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x):
        # Compute in the base's dtype with the same op the base uses, so a = 0 is bit-exact.
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


class NewHead(nn.Module):
    """A trainable bottleneck head: D -> bottleneck -> vocabulary."""

    def __init__(self, d_res: int, bottleneck: int, vocab: int):
        super().__init__()
        self.down = nn.Linear(d_res, bottleneck, bias=False)
        self.out = nn.Linear(bottleneck, vocab, bias=False)

    def forward(self, x):
        return self.out(self.down(x.to(self.down.weight.dtype)))


class HeadCorrection(nn.Module):
    """A low-rank correction of the inherited head, U (V x), added to W x scaled by alpha.

    W x only reaches logits in W's column space (rank <= hidden size, far below the vocabulary);
    whatever the carry-on adds to the residual stream stays there. U V adds r directions of its
    own. U starts at zero, so training begins from the carry-on alone (as LoRA's B does)."""

    def __init__(self, d_res: int, rank: int, vocab: int):
        super().__init__()
        self.down = nn.Linear(d_res, rank, bias=False)
        self.up = nn.Linear(rank, vocab, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.up(self.down(x.to(self.down.weight.dtype)))


# ---------------------------------------------------------------------------------------------
# The carry-on.
# ---------------------------------------------------------------------------------------------


class CarryOn(nn.Module):
    """Stacked carry-on stages plus the head.

    `dims[b]` lists the widths of base b's sources (deep first, then shallow layers);
    the residual stream is base 0's deep state, of width dims[0][0].
    """

    def __init__(
        self,
        arch: ArchConfig,
        head: HeadConfig,
        dims: list[list[int]],
        vocab_size: int,
        fusion: str = "average",
        head_weight: torch.Tensor | None = None,
        head_bias: torch.Tensor | None = None,
        alpha: float = 0.1,
    ):
        super().__init__()
        self.arch, self.head_cfg, self.dims, self.fusion_mode = arch, head, dims, fusion
        self.vocab_size = vocab_size
        self.d_res = dims[0][0]
        self.stages = nn.ModuleList(Stage(arch, dims, fusion, self.d_res) for _ in range(arch.stages))
        # alpha per stage: a buffer set from outside (validation search), never a parameter.
        self.register_buffer("alphas", torch.full((arch.stages,), float(alpha)))
        if head.kind == "inherited":
            self.head = InheritedHead(head_weight, head_bias)
        else:
            self.head = NewHead(self.d_res, head.bottleneck, vocab_size)
        self.correction = HeadCorrection(self.d_res, head.rank, vocab_size) if head.rank else None
        self.freeze_earlier_stages()
        self._number_attention_layers()

    def _number_attention_layers(self) -> None:
        """Give every attention layer, across stages, its own index in a KV cache."""
        layers = [m for m in self.modules() if isinstance(m, (Attention, LatentAttention))]
        for i, m in enumerate(layers):
            m.layer_id = i

    @property
    def uses_cache(self) -> bool:
        """Whether decoding needs a KV cache (the MLP carry-on is position-wise)."""
        return self.arch.kind == "transformer"

    # -- growing in depth -------------------------------------------------------------------
    def freeze_earlier_stages(self) -> None:
        """Only the newest stage (and a new head) train; earlier stages stay bit-identical."""
        for i, stage in enumerate(self.stages):
            stage.requires_grad_(i == len(self.stages) - 1)
            for name, p in stage.named_parameters():
                if getattr(p, "frozen_copy", False):  # copied weights train only through their deltas
                    p.requires_grad_(False)
                elif name.endswith((".A", ".B")):  # low-rank deltas (growing's LoRA phase)
                    p.requires_grad_(True)
        if isinstance(self.head, NewHead):
            self.head.requires_grad_(True)
        if self.correction is not None:  # the head's correction serves every stage: it keeps training
            self.correction.requires_grad_(True)

    def grow(self, alpha: float = 0.1) -> None:
        """Append a new stage (boosting): train it with everything before it frozen."""
        ref = self.stages[0].f.weight
        self.stages.append(Stage(self.arch, self.dims, self.fusion_mode, self.d_res).to(ref.device, ref.dtype))
        self.alphas = torch.cat([self.alphas, self.alphas.new_tensor([alpha])])
        self.arch = self.arch.model_copy(update={"stages": len(self.stages)})
        self.freeze_earlier_stages()
        self._number_attention_layers()

    def set_alpha(self, alpha: float, stage: int = -1) -> None:
        self.alphas[stage] = float(alpha)

    @property
    def alpha(self) -> float:
        return float(self.alphas[-1])

    # -- the one forward ----------------------------------------------------------------------
    def update(self, sources, residual=None, positions=None, key_mask=None, cache=None, attn_mask=None):
        """Run all stages; return (x_{T-1}, dx_T).

        sources: list over bases of [deep, shallow...] tensors [B, T, d] (what the bridge
        delivers); residual: base 0's exact deep state when known (serving), else sources[0][0].
        Training and evaluation pass neither positions nor a cache (positions 0..T-1, `key_mask`
        for padding); the decode engine passes each row's positions, its KV cache (any object with
        `update(k, v, layer_id) -> (all k, all v)`) and the matching `attn_mask`.
        Splitting off the last stage's dx lets validation score many alphas from one forward.
        """
        dtype = self.stages[0].f.weight.dtype
        sources = [[s.to(dtype) for s in base] for base in sources]
        x = (sources[0][0] if residual is None else residual).to(dtype)
        if positions is None:
            B, T = x.shape[:2]
            positions = torch.arange(T, device=x.device).expand(B, T)
        dx = None
        for i, stage in enumerate(self.stages):
            if dx is not None:  # previous stage's update joins the residual stream
                x = x + self.alphas[i - 1] * dx
            srcs = sources if i == 0 else [[x] + sources[0][1:]] + sources[1:]
            dx = stage(srcs, positions, key_mask, cache, attn_mask)
        return x, dx

    def forward(self, sources, residual=None, positions=None, key_mask=None, cache=None, attn_mask=None, alpha=None):
        """Residual stream after the carry-on: x_T = x_{T-1} + a_T dx_T (feed to `logits`).
        `alpha` may be a number or a per-row tensor [B] (rows of different requests)."""
        x, dx = self.update(sources, residual, positions, key_mask, cache, attn_mask)
        a = self.alphas[-1] if alpha is None else alpha
        if isinstance(a, torch.Tensor) and a.dim() == 1:
            a = a.to(dx)[:, None, None]
        return x + a * dx

    def states_at(self, sources, alphas: list[float], **kw):
        """(alpha, x_{T-1} + alpha dx_T) for each candidate alpha, from one carry-on forward: alpha only
        scales the last stage's dx, so validation scores every candidate without re-running it."""
        x, dx = self.update(sources, **kw)
        for a in alphas:
            yield a, x + a * dx

    def base_state(self, sources, positions=None, attn_mask=None) -> torch.Tensor:
        """The base's own final state (the replay KL's reference): the deep source itself."""
        return sources[0][0]

    def logits(self, x: torch.Tensor, alpha=None) -> torch.Tensor:
        """Vocabulary logits of the residual stream x [..., D]: W x, plus alpha * U (V x) with a head
        correction. `alpha` (default: the last stage's) must be the one x was formed with; a number
        or a per-row tensor [B]. At alpha = 0 the result is W x exactly (the correction is skipped
        for a number, multiplied by an exact zero for a row)."""
        y = self.head(x)
        if self.correction is None:
            return y
        a = self.alphas[-1] if alpha is None else alpha
        if not isinstance(a, torch.Tensor):
            if a == 0:
                return y
            a = torch.tensor(float(a))
        a = a.to(device=y.device, dtype=torch.float32)
        if a.dim() == 1:  # one alpha per row of x [B, ..., D]
            a = a.view(-1, *([1] * (y.dim() - 1)))
        return y + (a * self.correction(x).float()).to(y.dtype)

    # -- mixture of experts ------------------------------------------------------------------
    def moe_layers(self, stage: int = -1) -> list[MoE]:
        return [m for m in self.stages[stage].modules() if isinstance(m, MoE)]

    def balance_loss(self) -> torch.Tensor:
        """Load-balancing loss of the training stage's MoE layers from the last forward (0 without)."""
        layers = self.moe_layers()
        return torch.stack([m.balance_loss for m in layers]).mean() if layers else torch.zeros(())

    def set_router_dropout(self, p: float, seed: int = 0) -> None:
        """Router dropout `p` for the training stage's MoE layers, each drawing its hidden experts
        from its own seed derived from `seed` (a fresh `seed` per step gives fresh masks)."""
        for i, m in enumerate(self.moe_layers()):
            m.router_dropout = float(p)
            m.noise_seed = hash((seed, i)) & (2**63 - 1)  # int tuples hash the same in every process

    def expert_usage(self, reset: bool = True) -> list[list[float]]:
        """Per MoE layer of the newest stage, each expert's share of routed slots since the last reset."""
        shares = []
        for m in self.moe_layers():
            total = float(m.usage.sum())
            shares.append([float(u) / total if total else 0.0 for u in m.usage])
            if reset:
                m.reset_usage()
        return shares

    # -- bookkeeping ----------------------------------------------------------------------------
    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
