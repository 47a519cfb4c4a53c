"""The base's own layer loop over one flattened batch of tokens: one forward per engine step.

Hugging Face's forward takes a rectangular [rows, T] batch, so a step that decodes 16 rows (one
token each) and prefills a 30-token prompt chunk either pads every decode row to 30 tokens or runs
two forwards; on a CPU both cost about a second full read of the weights, which is what a decode
step costs. Here the step's tokens are one flat list instead (vLLM v1's layout): every token
carries its row's KV slot and its position. Each linear layer (and the MLP) runs once over all of
them; only attention is per row: the decode tokens, whose rows hold slots 0..d-1, attend in one
batched call to their rows' cached keys read in place; each prompt chunk attends to its row's
cached prefix plus itself, causally.

The loop runs the base's own modules (embeddings, rotary embedding, blocks' norms, projections and
MLP, final norm), so it loads nothing and a recycled-top adapter's deltas, bound to the base's top
linear layers, apply here per token. It is written for the Llama block (Llama, Mistral without a
sliding window, Qwen2: q/k/v/o projections with optional bias, RMSNorm, RoPE, gated MLP);
`unsupported(base)` says why another base cannot use it, and the engine then runs the padded
Hugging Face forward instead. Device-agnostic: the same code runs on CPU and CUDA, fp32 or bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LLAMA_BLOCKS = ("llama", "mistral", "qwen2")


def unsupported(base) -> str | None:
    """Why this base cannot run the flat layer loop (None: it can)."""
    cfg = base.model.config
    kind = getattr(cfg, "model_type", "?")
    if kind not in LLAMA_BLOCKS:
        return f"model_type {kind!r} is not a Llama-style block ({', '.join(LLAMA_BLOCKS)})"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention"
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return "layers other than full attention"
    inner = base.model.model
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(inner, name):
            return f"the decoder has no {name}"
    return None


@dataclass
class Span:
    """One row's tokens in the flat batch: tokens [offset, offset + n) at positions start.. in `slot`."""

    slot: int
    start: int
    n: int
    offset: int


@dataclass
class FlatBatch:
    """The tokens of one step. The first `decode` spans are decode rows (one token each, slots
    0..decode-1 in order); the rest are prompt chunks."""

    ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    slots: torch.Tensor  # [N]
    spans: list[Span]
    decode: int

    @classmethod
    def build(cls, decode: list[tuple[int, int, int]], chunks: list[tuple[int, int, list[int]]]) -> "FlatBatch":
        """decode: (slot, position, token) per decode row; chunks: (slot, start, tokens) per prompt chunk."""
        ids, pos, slots, spans = [], [], [], []
        for slot, p, t in decode:
            spans.append(Span(slot, p, 1, len(ids)))
            ids.append(t), pos.append(p), slots.append(slot)
        for slot, start, toks in chunks:
            spans.append(Span(slot, start, len(toks), len(ids)))
            ids += toks
            pos += range(start, start + len(toks))
            slots += [slot] * len(toks)
        return cls(torch.tensor(ids), torch.tensor(pos), torch.tensor(slots), spans, len(decode))


class LayerLoop:
    """The decoder stack of one Llama-style base, run over a FlatBatch against a KV slot pool."""

    def __init__(self, base):
        self.base = base
        self.model = base.model.model
        cfg = base.model.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.scale = self.head_dim ** -0.5

    @torch.inference_mode()
    def forward(self, batch: FlatBatch, pool, shallow: list[int] = ()) -> list[torch.Tensor]:
        """[final state after the norm, output of block k for k in shallow (0 = embeddings)], each [N, D];
        writes every token's keys and values into its slot of `pool` (generation.KVPool)."""
        m, device = self.model, self.base.device
        ids, positions = batch.ids.to(device), batch.positions.to(device)
        slots = batch.slots.to(device)
        span = max(s.start + s.n for s in batch.spans)
        pool.reserve(max(s.slot for s in batch.spans) + 1, span)
        h = m.embed_tokens(ids)
        cos, sin = (t[0] for t in m.rotary_emb(h[None], positions[None]))  # [N, head_dim]
        cos, sin = cos[:, None], sin[:, None]
        masks = self._masks(batch, device)
        seen = {0: h} if 0 in shallow else {}
        L = len(m.layers)
        for i, layer in enumerate(m.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(-1, self.heads, self.head_dim)
            k = attn.k_proj(x).view(-1, self.kv_heads, self.head_dim)
            v = attn.v_proj(x).view(-1, self.kv_heads, self.head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            K, V = pool.layer(i, k, v)
            K[slots, :, positions] = k
            V[slots, :, positions] = v
            o = self._attend(batch, q, K, V, masks)
            h = h + attn.o_proj(o.reshape(o.shape[0], -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            if i + 1 in shallow and i + 1 < L:
                seen[i + 1] = h
        h = m.norm(h)
        return [h] + [h if k == L else seen[k] for k in shallow]

    def _masks(self, batch: FlatBatch, device) -> list:
        """Per attention call, the bool mask (True = may attend): one for the decode rows together,
        one per prompt chunk (None for a chunk from position 0: plain causal)."""
        out = []
        d = batch.decode
        if d:
            pos = torch.tensor([s.start for s in batch.spans[:d]], device=device)
            width = int(pos.max()) + 1
            out.append((torch.arange(width, device=device)[None, :] <= pos[:, None])[:, None, None, :])
        for s in batch.spans[d:]:
            if s.start == 0:
                out.append(None)
            else:
                q = torch.arange(s.start, s.start + s.n, device=device)
                out.append((torch.arange(s.start + s.n, device=device)[None, :] <= q[:, None])[None, None])
        return out

    def _attend(self, batch: FlatBatch, q, K, V, masks) -> torch.Tensor:
        """Attention output [N, heads, head_dim] for every token of the batch."""
        out = torch.empty_like(q)
        d, gqa = batch.decode, self.kv_heads != self.heads
        j = 0
        if d:
            mask = masks[0]
            width = mask.shape[-1]
            slots = [sp.slot for sp in batch.spans[:d]]
            first = slots[0]
            # decode rows hold consecutive slots (the scheduler keeps them so): read the cache in place
            rows = slice(first, first + d) if slots == list(range(first, first + d)) else torch.tensor(slots)
            o = F.scaled_dot_product_attention(q[:d, :, None], K[rows, :, :width], V[rows, :, :width], attn_mask=mask,
                                               scale=self.scale, enable_gqa=gqa)
            out[:d] = o[:, :, 0]
            j = 1
        for s, mask in zip(batch.spans[d:], masks[j:]):
            qs = q[s.offset : s.offset + s.n].transpose(0, 1)[None]  # [1, heads, n, dim]
            ks = K[s.slot : s.slot + 1, :, : s.start + s.n]
            vs = V[s.slot : s.slot + 1, :, : s.start + s.n]
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None,
                                               scale=self.scale, enable_gqa=gqa)
            out[s.offset : s.offset + s.n] = o[0].transpose(0, 1)
        return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
