"""Base + carry-on as a language model: full-sequence logits, and one decode engine for every
kind of generation (offline `generate`, many adapters at once, the Serve replicas).

The engine schedules at the level of single decoding steps, as vLLM and TGI do (iteration-level
scheduling, Orca OSDI '22), and each step is schedule -> execute -> update (vLLM v1's shape):
the `Scheduler` (scheduler.py, no tensors) retires finished or cancelled rows, admits waiting ones
and plans every decoding row's next token plus prompt chunks within a bounded prompt-token
budget (a long prompt is fed in chunks, so it cannot stall everyone's next token); the model
runner (runner.py) feeds ALL of the plan's tokens through the base in one forward over a flat
token batch, whatever adapter each row uses; each adapter's carry-on runs on its rows; the
`Sampler` picks a token per row; the step returns its tokens and ended rows as events (text is
made from them after the step, outside the lock). No request waits for a batch-mate to finish.

KV memory is per row, in a preallocated slot pool (`KVPool`): one tensor per layer holding every
running row's keys and values at their own positions. We chose a slot pool over paged blocks
because torch on CPU has no paged-attention kernel: with slots, the decode rows of a step are a
contiguous range of the pool (running rows are kept compacted, decoding rows first), so attention
reads the cache in place; admitting a row writes only its own slot, and retiring one moves at most
two rows. The pool grows by doubling (rows, then positions) up to the base's context, and is
released when the engine goes idle. Carry-on transformers keep their (small) caches in a pool per
adapter. Bases the flat layer loop does not cover run Hugging Face's padded forward instead (a
decode batch and a prefill batch per step), over the same pool through the Cache interface.

The carry-on reads bridge-roundtripped states, exactly what it saw in training; the residual it
corrects is the base's exact final state, so alpha = 0 gives the base's own tokens.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .adapter import AdapterError, load_adapter, read_adapter_config, resolve_adapter
from .base import FrozenBase, positions_from_mask
from .bridge import Bridge, Bridges
from .config import BaseModelConfig
from .model import CarryOn, InheritedHead
from .recycled import RecycledTop, bind_rows, delta_sites, unbind
from .runner import FlatBatch, LayerLoop, unsupported
from .scheduler import Request, Scheduler, Sequence, StepPlan

# Below this temperature a row decodes greedily: logits / T overflows float32 long before T
# reaches 0 (vLLM uses the same cut-off).
MIN_TEMPERATURE = 1e-5


# ---------------------------------------------------------------------------------------------
# Adapters.
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
        in its dtype: the base's top blocks get the linear wrappers its deltas bind to (once per base;
        nothing changes for rows of other adapters)."""
        self.carryon = self.carryon.to(base.device)
        if self.recycled:
            c = self.carryon
            for p in c.deltas.parameters():  # the deltas add to the base's activations in its dtype
                p.data = p.data.to(base.dtype)
            base.delta_sites.update(delta_sites(base.model.model.layers, c.first, list(c.arch.targets)))
        return self

    @property
    def recycled(self) -> bool:
        return isinstance(self.carryon, RecycledTop)

    @property
    def num_bases(self) -> int:
        return len(self.bridges)

    @property
    def alpha(self) -> float:
        return self.carryon.alpha


# ---------------------------------------------------------------------------------------------
# KV memory.
# ---------------------------------------------------------------------------------------------


class KVPool:
    """Keys and values of many sequences for every attention layer of one model.

    Per layer, one tensor [slots, heads, positions, dim] for keys and one for values (any two
    tensors a layer caches: MLA stores its latent and RoPE key). Before a forward the engine
    `bind`s which slot each row of the batch uses and where its new positions start; the model's
    attention layers then call `update(k, v, layer_id)` (the Hugging Face Cache interface), which
    writes the new positions and returns every cached position of those rows. A contiguous range
    of slots comes back as a view of the pool, without a copy.
    """

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.slots, self.length = 0, 0  # allocated capacity
        self._rows: slice | torch.Tensor = slice(0, 0)
        self._index = torch.zeros(0, 1, 0, dtype=torch.long)  # write positions [B, 1, T] -> pool index
        self._slot_index = torch.zeros(0, 1, dtype=torch.long)
        self._span = 0

    def bind(self, slots: list[int], starts: torch.Tensor, T: int) -> None:
        """The next forward feeds T positions per row: row i into slot slots[i] at positions
        starts[i] .. starts[i] + T - 1 (right-padded rows write junk past their real tokens; it is
        never attended to and is overwritten by the row's next tokens)."""
        self._span = int(starts.max()) + T
        self._reserve(max(slots) + 1, self._span)
        lo = slots[0]
        contiguous = slots == list(range(lo, lo + len(slots)))
        self._rows = slice(lo, lo + len(slots)) if contiguous else torch.tensor(slots)
        self._slot_index = torch.tensor(slots)[:, None]
        self._index = starts[:, None] + torch.arange(T)[None, :]

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_id: int, *args, **kwargs):
        if layer_id not in self.k:
            self.k[layer_id] = k.new_zeros(self.slots, k.shape[1], self.length, k.shape[3])
            self.v[layer_id] = v.new_zeros(self.slots, v.shape[1], self.length, v.shape[3])
        K, V = self.k[layer_id], self.v[layer_id]
        idx = self._index.to(K.device)
        slots = self._slot_index.to(K.device)
        K[slots, :, idx] = k.transpose(1, 2)  # [B, T, H, d] into each row's own positions
        V[slots, :, idx] = v.transpose(1, 2)
        rows = self._rows if isinstance(self._rows, slice) else self._rows.to(K.device)
        return K[rows, :, : self._span], V[rows, :, : self._span]

    def layer(self, layer_id: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole pool of one layer ([slots, heads, positions, dim] keys and values), created on first
        use in the dtype and shape of `k` and `v` (the flat layer loop writes and reads it directly)."""
        if layer_id not in self.k:
            self.k[layer_id] = k.new_zeros(self.slots, k.shape[-2], self.length, k.shape[-1])
            self.v[layer_id] = v.new_zeros(self.slots, v.shape[-2], self.length, v.shape[-1])
        return self.k[layer_id], self.v[layer_id]

    def reserve(self, slots: int, length: int) -> None:
        self._reserve(slots, length)

    def move(self, src: int, dst: int, upto: int) -> None:
        """Copy slot src's first `upto` positions into slot dst (compaction)."""
        self._reserve(max(src, dst) + 1, self.length)
        for t in (*self.k.values(), *self.v.values()):
            t[dst, :, :upto] = t[src, :, :upto]

    def swap(self, a: int, b: int, upto: int) -> None:
        # A row can be admitted to a slot past the capacity before its first forward binds it (its
        # prefill waits for the step's token budget); a swap with it grows the pool first.
        self._reserve(max(a, b) + 1, self.length)
        for t in (*self.k.values(), *self.v.values()):
            tmp = t[a, :, :upto].clone()
            t[a, :, :upto] = t[b, :, :upto]
            t[b, :, :upto] = tmp

    def _reserve(self, slots: int, length: int) -> None:
        """Grow capacity by doubling (copying once) so that `slots` x `length` fits."""
        if slots <= self.slots and length <= self.length:
            return
        new_slots = max(self.slots, 4)
        while new_slots < slots:
            new_slots *= 2
        new_len = max(self.length, 64)
        while new_len < length:
            new_len *= 2
        new_len = max(min(new_len, self.max_len), length)
        for store in (self.k, self.v):
            for i, t in store.items():
                grown = t.new_zeros(new_slots, t.shape[1], new_len, t.shape[3])
                grown[: t.shape[0], :, : t.shape[2]] = t
                store[i] = grown
        self.slots, self.length = new_slots, new_len

    def clear(self) -> None:
        self.k.clear()
        self.v.clear()
        self.slots = self.length = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values()))


def step_mask(starts: torch.Tensor, T: int, span: int, device) -> torch.Tensor:
    """[B, 1, T, span] bool: row i's query j (at position starts[i] + j) sees cached positions up to
    its own."""
    q = (starts[:, None] + torch.arange(T)[None, :]).to(device)
    return (torch.arange(span, device=device)[None, None, :] <= q[:, :, None])[:, None]


# ---------------------------------------------------------------------------------------------
# The engine: schedule (carryon_ray/scheduler.py) -> execute (the runner, the carry-ons) -> sample -> update.
# ---------------------------------------------------------------------------------------------


@dataclass
class EngineStats:
    steps: int = 0
    tokens: int = 0  # generated
    prompt_tokens: int = 0  # prefilled
    forwards: int = 0  # base forwards (one per step with the flat layer loop; up to two without)
    finished: dict = field(default_factory=dict)  # finish_reason -> count
    adapter_rows: dict = field(default_factory=dict)  # adapter name -> rows admitted


@dataclass
class StepOutput:
    """What one step produced: every sampled token (row, token id) in order, and the rows that ended.
    The caller turns tokens into text after the step, outside the engine's lock."""

    tokens: list[tuple[Sequence, int]] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)


class _AdapterSlots:
    """The KV pool of one transformer adapter and which of its slots are free."""

    def __init__(self, max_len: int):
        self.pool = KVPool(max_len)
        self.free: list[int] = []
        self.used = 0

    def take(self) -> int:
        if self.free:
            return self.free.pop()
        self.used += 1
        return self.used - 1

    def give(self, slot: int) -> None:
        self.free.append(slot)


class Engine:
    """Iteration-level scheduling over one base (or several, for mixed-base adapters).

    Each `step()`: the scheduler plans (retire, admit, decode tokens, prompt chunks); the model
    runner feeds all of the plan's tokens through the base in ONE forward (`forward="flat"`, the
    base's own layer loop, carryon_ray/runner.py), or, for bases that loop does not cover and with
    `forward="padded"`, as a padded decode forward and a padded prefill forward; each adapter's
    carry-on runs on its rows; the sampler picks a token per row; the scheduler is told what ended.
    Not thread-safe by itself except `submit` and `Sequence.cancel/stop`: one thread calls `step()`
    (serve/engine.py runs that loop for a Serve replica; `run` does it for offline generation).
    """

    def __init__(self, bases: FrozenBase | list[FrozenBase], max_rows: int = 32, prefill_tokens: int = 512,
                 max_len: int | None = None, forward: str = "flat", prefill_tokens_decoding: int | None = None):
        self.bases = bases if isinstance(bases, list) else [bases]
        base = self.base = self.bases[0]
        context = int(getattr(base.model.config, "max_position_embeddings", 0) or 1 << 20)
        self.max_len = min(max_len or context, context)
        self.pad, self.eos = base.tokenizer.pad_token_id, base.tokenizer.eos_token_id
        self.pools = [KVPool(self.max_len) for _ in self.bases]
        self.adapter_slots: dict[int, _AdapterSlots] = {}
        self.scheduler = Scheduler(max_rows, prefill_tokens, self.max_len, on_swap=self._swap_kv,
                                   prefill_tokens_decoding=prefill_tokens_decoding)
        if forward not in ("flat", "padded"):
            raise ValueError(f"forward must be 'flat' or 'padded', not {forward!r}")
        why = [unsupported(b) for b in self.bases] if forward == "flat" else ["forward='padded' was asked for"]
        self.padded_because = next((w for w in why if w), None)  # None: the flat layer loop runs
        self.loops = [LayerLoop(b) for b in self.bases] if self.padded_because is None else []
        self.sampler = Sampler()
        self.stats = EngineStats()
        self.lock = threading.Lock()  # held for the length of a step (stats readers take it too)

    # -- the scheduler's state, read by the replica's stats --------------------------------------
    max_rows = property(lambda self: self.scheduler.max_rows)
    rows = property(lambda self: self.scheduler.rows)
    decoding = property(lambda self: self.scheduler.decoding)

    @property
    def flat(self) -> bool:
        return self.padded_because is None

    def queued(self) -> int:
        return self.scheduler.queued()

    # -- requests -----------------------------------------------------------------------------
    def submit(self, request: Request) -> Sequence:
        """Queue a request (thread-safe); it is admitted at a coming step."""
        return self.scheduler.submit(request)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def run(self, requests: list[Request]) -> list[Sequence]:
        """Offline: submit everything, step until all are done, return the sequences in order."""
        seqs = [self.submit(r) for r in requests]
        while not all(s.done for s in seqs):
            self.step()
        return seqs

    # -- one step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> StepOutput:
        """Schedule, run the step's tokens, sample, update. Returns the step's tokens and ended rows."""
        with self.lock:
            plan = self.scheduler.schedule()
            out = StepOutput(finished=list(plan.finished))
            for seq in plan.admitted:
                self._admitted(seq)
            if not plan.empty:
                self.stats.prompt_tokens += sum(len(c.tokens) for c in plan.prefill)
                groups = [(plan.decode, [[s.pending] for s in plan.decode]),
                          ([c.seq for c in plan.prefill], [c.tokens for c in plan.prefill])]
                states = self._flat_states(plan) if self.flat else [None, None]
                for (seqs, feeds), st in zip(groups, states):
                    if seqs:
                        self._forward(seqs, feeds, out, st)
            for seq in out.finished:
                if seq.slot >= 0:
                    self._release(seq)
            self.stats.steps += 1
            for seq in out.finished:
                self.stats.finished[seq.finish_reason] = self.stats.finished.get(seq.finish_reason, 0) + 1
            if not self.rows:  # idle: give the KV memory back
                for pool in self.pools:
                    pool.clear()
                self.adapter_slots.clear()
            return out

    def abort_all(self, reason: str) -> list[Sequence]:
        """End every waiting and running row with an error and reset the KV memory (after a step
        failed midway, the rows' caches cannot be trusted). Returns the rows ended."""
        with self.lock:
            ended = self.scheduler.abort_all()
            for s in ended:
                s.finish_reason, s.error = "error", reason
            for pool in self.pools:
                pool.clear()
            self.adapter_slots.clear()
            return ended

    def _admitted(self, seq: Sequence) -> None:
        r = seq.request
        if r.seed is not None:  # a seeded row owns its generator (same seed, same tokens, whatever else runs)
            seq.generator = torch.Generator(device="cpu")
            seq.generator.manual_seed(r.seed)
        name = r.label or ("adapter" if r.adapter is not None else "base")
        self.stats.adapter_rows[name] = self.stats.adapter_rows.get(name, 0) + 1
        if r.adapter is not None and r.adapter.carryon.uses_cache:
            slots = self.adapter_slots.setdefault(id(r.adapter), _AdapterSlots(self.max_len))
            seq.adapter_slot = slots.take()

    # -- the forward ----------------------------------------------------------------------------
    def _flat_states(self, plan: StepPlan) -> list:
        """Every token of the plan through each base in one flat forward; the states come back in the
        padded per-group layout the carry-ons read: [decode rows, 1, D] and [prefill rows, T, D]."""
        base, device = self.base, self.base.device
        batch = FlatBatch.build([(s.slot, s.fed, s.pending) for s in plan.decode],
                                [(c.seq.slot, c.start, c.tokens) for c in plan.prefill])
        seqs = [*plan.decode, *(c.seq for c in plan.prefill)]
        adapters = [s.request.adapter for s in seqs]
        shallow = sorted({k for a in adapters if a is not None for k in a.shallow})
        n_bases = max([1] + [a.num_bases for a in adapters if a is not None])
        # Recycled-top rows are adapted inside base 0's forward: their deltas bind to its top blocks per
        # token (a prompt chunk's tokens share one matmul; lone decode tokens one gathered matmul).
        tokens: dict[int, tuple] = {}
        for sp, s in zip(batch.spans, seqs):
            a = s.request.adapter
            if a is not None and a.recycled:
                _, idx, al = tokens.setdefault(id(a), (a.carryon, [], []))
                idx += range(sp.offset, sp.offset + sp.n)
                al += [self._alpha(s)] * sp.n
        inside = list(tokens.values())
        states = []
        for b in range(n_bases):
            if b == 0 and inside:
                bind_rows(base.delta_sites, inside, device)
            try:
                states.append(self.loops[b].forward(batch, self.pools[b], shallow))
            finally:
                if b == 0 and inside:
                    unbind(base.delta_sites)
        self.stats.forwards += 1
        d = batch.decode
        decode = [[st[:d, None] for st in per] for per in states]
        spans = batch.spans[d:]
        prefill = None
        if spans:
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
        return [(decode, shallow), (prefill, shallow) if prefill is not None else None]

    def _forward(self, seqs: list[Sequence], feeds: list[list[int]], result: StepOutput, given=None) -> None:
        """The carry-ons and heads of `seqs` (a contiguous range of slots), each fed its tokens; rows
        whose feed ends their prompt, and decoding rows, get a next token. `given`: (the base states of
        these rows from the flat forward, the shallow layers in them); None runs the padded Hugging Face
        forward for them here."""
        base, device = self.base, self.base.device
        B, T = len(seqs), max(len(f) for f in feeds)
        starts = torch.tensor([s.fed for s in seqs])
        positions = (starts[:, None] + torch.arange(T)[None, :]).to(device)
        span = int(starts.max()) + T
        mask = step_mask(starts, T, span, device)
        adapters = [s.request.adapter for s in seqs]
        shallow = sorted({k for a in adapters if a is not None for k in a.shallow})
        groups: dict[int, list[int]] = {}
        for i, a in enumerate(adapters):
            if a is not None:
                groups.setdefault(id(a), []).append(i)
        if given is None:
            states = self._padded_states(seqs, feeds, T, starts, positions, mask, shallow, groups)
        else:
            states, shallow = given
        for s, f in zip(seqs, feeds):
            s.fed += len(f)
        last = torch.tensor([len(f) - 1 for f in feeds], device=device)
        want = [i for i, s in enumerate(seqs) if s.decoding or s.fed == len(s.request.prompt)]
        x = states[0][0]
        out = x[torch.arange(B, device=device), last]  # each row's final state at its last fed token
        # Each adapter's rows through its carry-on (all of them: a transformer carry-on must see
        # every prompt token for its cache); rows whose head is the base's own share one projection.
        head_groups = []  # (adapter, its rows, their alphas) projected by the adapter's own logits
        for rows in groups.values():
            a = adapters[rows[0]]
            if a.recycled:  # already adapted in the base's forward; the base's own head projects it
                continue
            r = torch.tensor(rows, device=device)
            pick = [0] + [1 + shallow.index(k) for k in a.shallow]
            srcs = [[br.roundtrip(st[j][r]) for br, j in zip(brs, pick)] for brs, st in zip(a.bridges, states)]
            cache = None
            if a.carryon.uses_cache:
                pool = self.adapter_slots[id(a)].pool
                pool.bind([seqs[i].adapter_slot for i in rows], starts[rows], T)
                cache = pool
            alpha = torch.tensor([self._alpha(seqs[i]) for i in rows])
            group_span = int(starts[rows].max()) + T  # the group's own cache is only this long
            res = a.carryon(srcs, residual=x[r], positions=positions[r], cache=cache,
                            attn_mask=mask[r][..., :group_span], alpha=alpha)
            res = res[torch.arange(len(rows), device=device), last[r]]
            out[r] = res.to(out.dtype)
            if not (isinstance(a.carryon.head, InheritedHead) and a.carryon.head.weight is base.head_weight
                    and a.carryon.correction is None):
                head_groups.append((a, rows, alpha))  # its own head (and correction), below
        if not want:
            return
        w = torch.tensor(want, device=device)
        logits = torch.empty(len(want), base.vocab_size, dtype=torch.float32)
        own = {i for _, rows, _ in head_groups for i in rows}
        shared = [j for j, i in enumerate(want) if i not in own]
        if shared:
            logits[shared] = F.linear(out[w[shared]].to(base.head_weight.dtype), base.head_weight,
                                      base.head_bias).float().cpu()
        at = {i: j for j, i in enumerate(want)}
        for a, rows, alpha in head_groups:
            keep = [k for k, i in enumerate(rows) if i in at]
            if keep:
                r = torch.tensor([rows[k] for k in keep], device=device)
                logits[[at[rows[k]] for k in keep]] = a.carryon.logits(out[r], alpha[keep]).float().cpu()
        self._sample([seqs[i] for i in want], logits, result)

    def _padded_states(self, seqs, feeds, T, starts, positions, mask, shallow, groups) -> list:
        """The padded Hugging Face forward of `seqs` (every base once), for bases the flat loop does not cover."""
        base, device = self.base, self.base.device
        ids = torch.full((len(seqs), T), self.pad, dtype=torch.long)
        for i, f in enumerate(feeds):
            ids[i, : len(f)] = torch.tensor(f)
        slots = [s.slot for s in seqs]
        adapters = [s.request.adapter for s in seqs]
        n_bases = max([1] + [a.num_bases for a in adapters if a is not None])
        # Rows of recycled-top adapters are adapted inside base 0's forward: their deltas bind to its top
        # blocks for this forward (other rows untouched).
        inside = [(adapters[rows[0]].carryon, rows, [self._alpha(seqs[i]) for i in rows]) for rows in groups.values()
                  if adapters[rows[0]].recycled]
        states = []
        for b in range(n_bases):  # every base once for the whole batch
            self.pools[b].bind(slots, starts, T)
            if b == 0 and inside:
                bind_rows(base.delta_sites, inside, device)
            try:
                st, _ = self.bases[b].hidden_states(ids.to(device), self.bases[b].prepare_mask(mask), shallow,
                                                    past_key_values=self.pools[b], position_ids=positions,
                                                    use_cache=True)
            finally:
                if b == 0 and inside:
                    unbind(base.delta_sites)
            states.append(st)
        self.stats.forwards += 1
        return states

    @staticmethod
    def _alpha(seq: Sequence) -> float:
        """The row's alpha: its request's, else its adapter's own."""
        r = seq.request
        return r.adapter.alpha if r.alpha is None else r.alpha

    # -- sampling and update ----------------------------------------------------------------------
    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, out: StepOutput) -> None:
        """A next token per row (the Sampler), then each row's bookkeeping; whatever fails for one row
        (a broken adapter's NaN logits) ends that row alone."""
        picked = self.sampler(seqs, logits)
        now = time.monotonic()
        for seq, (token, entry, error) in zip(seqs, picked):
            r = seq.request
            if error is not None:
                seq.finish_reason, seq.error = "error", f"sampling failed: {error}"
                out.finished.append(seq)
                continue
            if entry is not None:
                seq.logprobs.append(entry)
            if seq.first_token_at is None:
                seq.first_token_at = now
                self.scheduler.started_decoding(seq)
            seq.tokens.append(token)
            seq.pending = token
            self.stats.tokens += 1
            out.tokens.append((seq, token))
            if r.stop_at_eos and token == self.eos:
                seq.finish_reason = "stop"
            elif len(seq.tokens) >= r.max_tokens or seq.fed + 1 >= self.max_len:
                seq.finish_reason = "length"
            if seq.done:
                out.finished.append(seq)

    # -- slots ----------------------------------------------------------------------------------
    def _swap_kv(self, i: int, j: int, upto: int) -> None:
        for pool in self.pools:
            pool.swap(i, j, upto)

    def _release(self, seq: Sequence) -> None:
        self.scheduler.release(seq)
        a = seq.request.adapter
        if a is not None and seq.adapter_slot >= 0:
            slots = self.adapter_slots.get(id(a))
            if slots is not None:
                slots.give(seq.adapter_slot)
            seq.adapter_slot = -1

    def kv_bytes(self) -> int:
        return sum(p.nbytes() for p in self.pools) + sum(s.pool.nbytes() for s in self.adapter_slots.values())


class Sampler:
    """Next tokens for a batch of rows' logits [rows, vocab] (float32, CPU).

    Penalties first (OpenAI's presence and frequency penalties on the generated tokens, the
    repetition penalty on prompt and generated tokens, as vLLM applies them), only for rows that ask.
    Greedy rows take one batched argmax; unseeded rows sampling the full distribution share one
    batched inverse-CDF draw from the engine's generator; only seeded rows (their own generator,
    so their tokens repeat whatever else runs) and nucleus rows draw one by one. Log-probabilities
    are those of the model's logits (vLLM's default), before penalties and temperature."""

    def __init__(self):
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(secrets.randbits(63))

    def __call__(self, seqs: list[Sequence], logits: torch.Tensor) -> list[tuple[int, dict | None, str | None]]:
        raw = logits
        bad = torch.isnan(logits).any(-1) | ~torch.isfinite(logits).any(-1)
        logits = self._penalize(seqs, logits)
        greedy = [s.request.temperature < MIN_TEMPERATURE for s in seqs]
        tokens = logits.argmax(-1).tolist()
        batched = [j for j, s in enumerate(seqs) if not greedy[j] and not bad[j] and s.generator is None
                   and s.request.top_p >= 1.0]
        if batched:
            t = torch.tensor([seqs[j].request.temperature for j in batched])[:, None]
            cdf = torch.softmax(logits[batched] / t, -1).cumsum(-1)
            u = torch.rand(len(batched), 1, generator=self.generator) * cdf[:, -1:]
            for j, tok in zip(batched, torch.searchsorted(cdf, u).clamp(max=cdf.shape[-1] - 1)[:, 0].tolist()):
                tokens[j] = tok
        done = set(batched)
        result = []
        for j, seq in enumerate(seqs):
            r = seq.request
            try:
                if bad[j]:
                    raise FloatingPointError("the model produced NaN or no finite logit")
                if not greedy[j] and j not in done:
                    tokens[j] = sample(logits[j], r.temperature, r.top_p, seq.generator or self.generator)
                entry = None
                if r.logprobs is not None:
                    lp = torch.log_softmax(raw[j], -1)
                    entry = {"logprob": float(lp[tokens[j]])}
                    if r.logprobs:
                        top = lp.topk(r.logprobs)
                        entry["top"] = list(zip(top.indices.tolist(), top.values.tolist()))
                result.append((tokens[j], entry, None))
            except (RuntimeError, FloatingPointError, ValueError) as exc:
                result.append((-1, None, str(exc)))
        return result

    @staticmethod
    def _penalize(seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        rows = [j for j, s in enumerate(seqs) if s.request.presence_penalty or s.request.frequency_penalty
                or s.request.repetition_penalty != 1.0]
        if not rows:
            return logits
        logits = logits.clone()
        V = logits.shape[-1]
        for j in rows:
            r, seq = seqs[j].request, seqs[j]
            if seq.tokens and (r.presence_penalty or r.frequency_penalty):
                counts = torch.bincount(torch.tensor(seq.tokens), minlength=V)[:V].to(logits.dtype)
                logits[j] -= r.frequency_penalty * counts + r.presence_penalty * (counts > 0).to(logits.dtype)
            if r.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(r.prompt) | set(seq.tokens)))
                x = logits[j, seen]
                logits[j, seen] = torch.where(x > 0, x / r.repetition_penalty, x * r.repetition_penalty)
        return logits


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """One token from a row of logits: nucleus sampling at `temperature`, by inverse CDF with one
    uniform draw (torch.multinomial and a full sort each cost ~1-4 ms on a 49k vocabulary on CPU;
    this costs ~0.1 ms). The nucleus is found among the top candidates, widened until it holds
    top_p of the mass, so it is exact. Safe for every valid parameter: the most likely token always
    stays in the nucleus (top_p may round to 0)."""
    probs = torch.softmax(logits.float() / max(temperature, MIN_TEMPERATURE), -1)
    idx = None
    if top_p < 1.0:
        k = 256
        while True:
            probs_k, idx = probs.topk(min(k, probs.numel()))
            if float(probs_k.sum()) >= top_p or k >= probs.numel():
                break
            k *= 4
        keep = probs_k.cumsum(-1) - probs_k < top_p
        keep[0] = True
        probs = probs_k * keep
    cdf = probs.cumsum(-1)
    u = torch.rand(1, generator=gen) * cdf[-1]
    j = int(torch.searchsorted(cdf, u).clamp(max=cdf.numel() - 1))
    return j if idx is None else int(idx[j])


# ---------------------------------------------------------------------------------------------
# The user-facing model and the many-adapter helper, both over the engine.
# ---------------------------------------------------------------------------------------------


def generate_mixed(bases: FrozenBase | list[FrozenBase], prompts: list[list[int]], adapters: list[Adapter | None],
                   max_new_tokens: list[int] | int = 64, temperature: list[float] | float = 0.0,
                   top_p: list[float] | float = 1.0, seeds: list[int | None] | None = None,
                   alphas: list[float | None] | None = None, stop_at_eos: bool = True) -> list[list[int]]:
    """Generate for rows that may each use a different adapter (None = the bare base): one base
    forward per step for every row, one carry-on forward per adapter. Greedy output for a row
    equals `CarryOnModel.generate` with that row's adapter alone."""
    n = len(prompts)

    def per(v, default=None):
        return list(v) if isinstance(v, (list, tuple)) else [v if v is not None else default] * n

    reqs = [Request(list(p), a, m, t, tp, s, al, stop_at_eos)
            for p, a, m, t, tp, s, al in zip(prompts, adapters, per(max_new_tokens), per(temperature), per(top_p),
                                             per(seeds), per(alphas))]
    engine = Engine(bases, max_rows=max(1, n), prefill_tokens=max(sum(len(p) for p in prompts), 1))
    return [s.tokens for s in engine.run(reqs)]


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
        if a is not None and a.recycled:  # the deltas act inside the base's own forward
            bind_rows(base.delta_sites, [(a.carryon, list(range(input_ids.shape[0])),
                                          [a.alpha if alpha is None else alpha] * input_ids.shape[0])], base.device)
            try:
                x = base.hidden_states(input_ids, mask, [], position_ids=positions)[0][0]
            finally:
                unbind(base.delta_sites)
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
