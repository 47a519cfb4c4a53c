"""The model runner: one step's tokens through the base(s) and every row's carry-on, to logits.

`execute(decode, chunks)` is the whole "execute" part of the engine's step, and it changes no row's
bookkeeping (only KV memory, at the positions the step feeds, which a re-run writes again), so the
engine can run it again for a part of the rows when it raises (see engine.py).

1. The base. With the flat layer loop (flat.py) every token of the step goes through each base in
   ONE forward; other bases run Hugging Face's padded forward, once for the decode rows and once for
   the prompt chunks. Recycled-top rows are adapted inside base 0's forward: their deltas are bound
   per token to the base's own linear layers (`bind_inside`): one matmul pair per layer for every
   adapted token of every adapter, whatever their ranks (recycled.RowDeltas).
2. The heads. Every other adapter's carry-on runs on its rows (all of a prompt chunk's tokens: a
   transformer carry-on must see each of them for its own cache); rows whose head is the base's own
   share one projection, the rest are projected by their adapter.

The carry-on reads bridge-roundtripped states, exactly what it saw in training; the residual it
corrects is the base's exact final state, so alpha = 0 gives the base's own tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import InheritedHead
from ..recycled import StackCache, bind_rows, serving_sites, unbind
from .flat import FlatBatch, LayerLoop, unsupported
from .kv import AdapterPools, KVPool, step_mask
from .scheduler import Chunk, Sequence


def row_alpha(seq: Sequence) -> float:
    """The row's alpha: its request's, else its adapter's own."""
    r = seq.request
    return r.adapter.alpha if r.alpha is None else r.alpha


def adapter_groups(seqs: list[Sequence]) -> dict:
    """adapter (None for the bare base) -> the indices of its rows in `seqs`, in order."""
    groups: dict = {}
    for i, s in enumerate(seqs):
        groups.setdefault(s.request.adapter, []).append(i)
    return groups


class ModelRunner:
    """The base(s), their KV pools, the adapters' caches, and the forward of one step."""

    def __init__(self, bases, max_len: int, forward: str = "flat"):
        if forward not in ("flat", "padded"):
            raise ValueError(f"forward must be 'flat' or 'padded', not {forward!r}")
        self.bases, self.base = bases, bases[0]
        self.max_len = max_len
        self.pad = self.base.tokenizer.pad_token_id
        self.pools = [KVPool(max_len) for _ in bases]
        self.adapter_pools = AdapterPools(max_len)
        why = [unsupported(b) for b in bases] if forward == "flat" else ["forward='padded' was asked for"]
        self.padded_because = next((w for w in why if w), None)  # None: the flat layer loop runs
        self.loops = [LayerLoop(b) for b in bases] if self.padded_because is None else []
        # Every delta site of base 0 is wrapped now, before any step: loading an adapter later never
        # changes the base's modules while a step runs.
        self.sites = serving_sites(self.base)
        self.stacks = StackCache()  # recycled adapters' stacked deltas of recent compositions
        self.forwards = 0  # base forwards run

    @property
    def flat(self) -> bool:
        return self.padded_because is None

    # -- KV memory ----------------------------------------------------------------------------------
    def admitted(self, seq: Sequence) -> None:
        a = seq.request.adapter
        if a is not None and a.carryon.uses_cache:
            seq.adapter_slot = self.adapter_pools.take(a)

    def free(self, seq: Sequence) -> None:
        """The row left the running set: its slot in its adapter's cache goes back."""
        if seq.adapter_slot >= 0:
            self.adapter_pools.give(seq.request.adapter, seq.adapter_slot)
            seq.adapter_slot = -1

    def swap(self, i: int, j: int, upto: int) -> None:
        for pool in self.pools:
            pool.swap(i, j, upto)

    def clear(self) -> None:
        """Give every KV tensor back (the engine is idle, or its rows were aborted)."""
        for pool in self.pools:
            pool.clear()
        self.adapter_pools.clear()
        self.stacks.clear()  # no adapter outlives its last row here

    def kv_bytes(self) -> int:
        return sum(p.nbytes() for p in self.pools) + self.adapter_pools.nbytes()

    # -- one step -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, decode: list[Sequence], chunks: list[Chunk]) -> tuple[list[Sequence], torch.Tensor]:
        """Feed each decode row its pending token and each chunk its prompt tokens; returns the rows
        that get a next token (decode rows, then rows whose prompt this step completes) and their
        logits [rows, vocab] (float32, CPU). Row bookkeeping (`fed`, tokens) is the caller's."""
        segments = [(list(decode), [[s.pending] for s in decode]),
                    ([c.seq for c in chunks], [c.tokens for c in chunks])]
        states = self._flat_states(decode, chunks) if self.flat else [None, None]
        wanted, logits = [], []
        for (seqs, feeds), st in zip(segments, states):
            if seqs:
                w, lg = self._heads(seqs, feeds, st)
                wanted += w
                logits.append(lg)
        return wanted, torch.cat(logits) if logits else torch.empty(0, self.base.vocab_size)

    def bind_inside(self, seqs: list[Sequence], rows_of: list) -> bool:
        """Bind the deltas of every recycled-top row: seqs[i]'s tokens are rows rows_of[i] of the next
        forward's input (flat token offsets, or padded batch rows). Returns whether any were bound."""
        groups: dict = {}
        for s, rows in zip(seqs, rows_of):
            a = s.request.adapter
            if a is not None and a.inside:
                _, idx, al = groups.setdefault(a, (a.carryon, [], []))
                idx += rows
                al += [row_alpha(s)] * len(rows)
        if groups:
            bind_rows(self.sites, list(groups.values()), self.base.device, self.stacks)
        return bool(groups)

    def _flat_states(self, decode: list[Sequence], chunks: list[Chunk]) -> list:
        """Every token of the step through each base in one flat forward; the states come back in the
        padded per-segment layout the carry-ons read: [decode rows, 1, D] and [prefill rows, T, D]."""
        device = self.base.device
        batch = FlatBatch.build([(s.slot, s.fed, s.pending) for s in decode],
                                [(c.seq.slot, c.start, c.tokens) for c in chunks])
        seqs = [*decode, *(c.seq for c in chunks)]
        adapters = [s.request.adapter for s in seqs]
        shallow = sorted({k for a in adapters if a is not None for k in a.shallow})
        n_bases = max([1] + [a.num_bases for a in adapters if a is not None])
        states = []
        for b in range(n_bases):
            bound = b == 0 and self.bind_inside(seqs, [range(sp.offset, sp.offset + sp.n) for sp in batch.spans])
            try:
                states.append(self.loops[b].forward(batch, self.pools[b], shallow))
            finally:
                if bound:
                    unbind(self.sites)
        self.forwards += 1
        d = batch.decode
        decoded = [[st[:d, None] for st in per] for per in states]
        spans = batch.spans[d:]
        if not spans:
            return [(decoded, shallow), None]
        T = max(sp.n for sp in spans)
        row = torch.cat([torch.full((sp.n,), i) for i, sp in enumerate(spans)]).to(device)
        col = torch.cat([torch.arange(sp.n) for sp in spans]).to(device)
        prefill = []
        for per in states:
            padded = []
            for st in per:
                p = st.new_zeros(len(spans), T, st.shape[-1])
                p[row, col] = st[d:]
                padded.append(p)
            prefill.append(padded)
        return [(decoded, shallow), (prefill, shallow)]

    def _padded_states(self, seqs, feeds, T, starts, positions, mask, shallow) -> list:
        """The padded Hugging Face forward of `seqs` (every base once), for bases the flat loop does not cover."""
        device = self.base.device
        ids = torch.full((len(seqs), T), self.pad, dtype=torch.long)
        for i, f in enumerate(feeds):
            ids[i, : len(f)] = torch.tensor(f)
        slots = [s.slot for s in seqs]
        adapters = [s.request.adapter for s in seqs]
        n_bases = max([1] + [a.num_bases for a in adapters if a is not None])
        states = []
        for b in range(n_bases):  # every base once for the whole batch
            self.pools[b].bind(slots, starts, T)
            bound = b == 0 and self.bind_inside(seqs, [[i] for i in range(len(seqs))])
            try:
                st, _ = self.bases[b].hidden_states(ids.to(device), self.bases[b].prepare_mask(mask), shallow,
                                                    past_key_values=self.pools[b], position_ids=positions,
                                                    use_cache=True)
            finally:
                if bound:
                    unbind(self.sites)
            states.append(st)
        self.forwards += 1
        return states

    def _heads(self, seqs: list[Sequence], feeds: list[list[int]], given=None) -> tuple[list[Sequence], torch.Tensor]:
        """The carry-ons and heads of `seqs`, each fed its tokens from position `fed`; returns the rows
        that get a next token and their logits. `given`: (the base states of these rows from the flat
        forward, the shallow layers in them); None runs the padded forward for them here."""
        base, device = self.base, self.base.device
        B, T = len(seqs), max(len(f) for f in feeds)
        starts = torch.tensor([s.fed for s in seqs])
        positions = (starts[:, None] + torch.arange(T)[None, :]).to(device)
        span = int(starts.max()) + T
        mask = step_mask(starts, T, span, device)
        groups = adapter_groups(seqs)
        if given is None:
            shallow = sorted({k for a in groups if a is not None for k in a.shallow})
            states = self._padded_states(seqs, feeds, T, starts, positions, mask, shallow)
        else:
            states, shallow = given
        last = torch.tensor([len(f) - 1 for f in feeds], device=device)
        want = [i for i, (s, f) in enumerate(zip(seqs, feeds))
                if s.decoding or s.fed + len(f) == len(s.request.prompt)]
        x = states[0][0]
        out = x[torch.arange(B, device=device), last]  # each row's final state at its last fed token
        own_head = []  # (adapter, its rows, their alphas) projected by the adapter's own logits
        for a, rows in groups.items():
            if a is None or a.inside:  # the bare base, or adapted inside the base's forward already
                continue
            r = torch.tensor(rows, device=device)
            pick = [0] + [1 + shallow.index(k) for k in a.shallow]
            srcs = [[br.roundtrip(st[j][r]) for br, j in zip(brs, pick)] for brs, st in zip(a.bridges, states)]
            cache = None
            if a.carryon.uses_cache:
                cache = self.adapter_pools.pool(a)
                cache.bind([seqs[i].adapter_slot for i in rows], starts[rows], T)
            alpha = torch.tensor([row_alpha(seqs[i]) for i in rows])
            group_span = int(starts[rows].max()) + T  # the group's own cache is only this long
            res = a.carryon(srcs, residual=x[r], positions=positions[r], cache=cache,
                            attn_mask=mask[r][..., :group_span], alpha=alpha)
            out[r] = res[torch.arange(len(rows), device=device), last[r]].to(out.dtype)
            if not (isinstance(a.carryon.head, InheritedHead) and a.carryon.head.weight is base.head_weight
                    and a.carryon.correction is None):
                own_head.append((a, rows, alpha))
        logits = torch.empty(len(want), base.vocab_size, dtype=torch.float32)
        if not want:
            return [], logits
        w = torch.tensor(want, device=device)
        own = {i for _, rows, _ in own_head for i in rows}
        shared = [j for j, i in enumerate(want) if i not in own]
        if shared:
            logits[shared] = F.linear(out[w[shared]].to(base.head_weight.dtype), base.head_weight,
                                      base.head_bias).float().cpu()
        at = {i: j for j, i in enumerate(want)}
        for a, rows, alpha in own_head:
            keep = [k for k, i in enumerate(rows) if i in at]
            if keep:
                r = torch.tensor([rows[k] for k in keep], device=device)
                logits[[at[rows[k]] for k in keep]] = a.carryon.logits(out[r], alpha[keep]).float().cpu()
        return [seqs[i] for i in want], logits
