"""Base + carry-on as a language model: full-sequence logits, and one decode engine for every
kind of generation (offline `generate`, many adapters at once, the Serve replicas).

The engine schedules at the level of single decoding steps, as vLLM and TGI do (iteration-level
scheduling, Orca OSDI '22): each `step()` retires finished or cancelled rows, admits waiting ones,
decodes one token for every running row (one base forward for all of them, whatever adapter each
uses, then one carry-on forward per adapter), and spends a bounded prompt-token budget prefilling
newly admitted rows (chunked, so a long prompt cannot stall everyone's next token). No request
waits for a batch-mate to finish.

KV memory is per row, in a preallocated slot pool (`KVPool`): one tensor per layer holding every
running row's keys and values at their own positions. We chose a slot pool over paged blocks
because torch on CPU has no paged-attention kernel: with slots, the rows of a step are a
contiguous range of the pool (running rows are kept compacted, decoding rows first), so attention
reads the cache in place; admitting a row writes only its own slot, and retiring one moves at most
two rows. The pool grows by doubling (rows, then positions) up to the base's context, and is
released when the engine goes idle. Carry-on transformers keep their (small) caches in a pool per
adapter.

The carry-on reads bridge-roundtripped states, exactly what it saw in training; the residual it
corrects is the base's exact final state, so alpha = 0 gives the base's own tokens.
"""

from __future__ import annotations

import itertools
import queue
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .adapter import AdapterError, load_adapter, read_adapter_config, resolve_adapter
from .base import FrozenBase, positions_from_mask
from .bridge import Bridge, Bridges
from .config import BaseModelConfig
from .model import CarryOn, InheritedHead
from .recycled import RecycledTop, bind_rows, delta_sites, unbind

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
# Requests and their rows.
# ---------------------------------------------------------------------------------------------


@dataclass
class Request:
    """What one generation asks for. `on_token(seq, token)` runs on the engine's thread after every
    token; returning True ends the row (a completed stop string)."""

    prompt: list[int]
    adapter: Adapter | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None  # None: fresh entropy for every request
    alpha: float | None = None  # None: the adapter's own alpha
    stop_at_eos: bool = True
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: also the top k
    deadline: float | None = None  # time.monotonic() after which the row is retired ("timeout")
    on_token: Callable[["Sequence", int], bool] | None = None
    label: str = ""  # the adapter's public name, for per-adapter counts


_ids = itertools.count()


@dataclass
class Sequence:
    """A request as it moves through the engine, and its result."""

    request: Request
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)  # per token: {"logprob", "top": [(id, logprob)]}
    finish_reason: str | None = None  # stop, length, cancelled, timeout, error
    error: str | None = None
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    # engine state
    cancelled: bool = False
    slot: int = -1  # index into the engine's running rows (and the base KV pools)
    adapter_slot: int = -1  # slot in the adapter's own KV pool
    fed: int = 0  # positions in the KV cache
    pending: int | None = None  # the last sampled token, not yet fed
    generator: torch.Generator | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def decoding(self) -> bool:
        return self.pending is not None

    def cancel(self) -> None:
        """Ask the engine to retire this row at its next step (thread-safe)."""
        self.cancelled = True


@dataclass
class EngineStats:
    steps: int = 0
    tokens: int = 0  # generated
    prompt_tokens: int = 0  # prefilled
    finished: dict = field(default_factory=dict)  # finish_reason -> count
    adapter_rows: dict = field(default_factory=dict)  # adapter name -> rows admitted


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


# ---------------------------------------------------------------------------------------------
# The engine.
# ---------------------------------------------------------------------------------------------


class Engine:
    """Iteration-level scheduler over one base (or several, for mixed-base adapters).

    Not thread-safe by itself except `submit` and `Sequence.cancel`: one thread calls `step()`
    (serve/engine.py runs that loop for a Serve replica; `run` does it for offline generation).
    """

    def __init__(self, bases: FrozenBase | list[FrozenBase], max_rows: int = 32, prefill_tokens: int = 512,
                 max_len: int | None = None):
        self.bases = bases if isinstance(bases, list) else [bases]
        base = self.base = self.bases[0]
        self.max_rows, self.prefill_tokens = max_rows, max(1, prefill_tokens)
        context = int(getattr(base.model.config, "max_position_embeddings", 0) or 1 << 20)
        self.max_len = min(max_len or context, context)
        self.pad, self.eos = base.tokenizer.pad_token_id, base.tokenizer.eos_token_id
        self.pools = [KVPool(self.max_len) for _ in self.bases]
        self.adapter_slots: dict[int, _AdapterSlots] = {}
        self.inbox: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        self.waiting: deque[Sequence] = deque()
        self.rows: list[Sequence] = []  # running, in slot order: decoding rows first, then prefilling
        self.decoding = 0  # rows[:decoding] decode; rows[decoding:] are still prefilling
        self.stats = EngineStats()
        self.lock = threading.Lock()  # held for the length of a step (stats readers take it too)

    # -- requests -----------------------------------------------------------------------------
    def submit(self, request: Request) -> Sequence:
        """Queue a request (thread-safe); it is admitted at a coming step."""
        seq = Sequence(request)
        self.inbox.put(seq)
        return seq

    def has_work(self) -> bool:
        return bool(self.rows or self.waiting or not self.inbox.empty())

    def run(self, requests: list[Request]) -> list[Sequence]:
        """Offline: submit everything, step until all are done, return the sequences in order."""
        seqs = [self.submit(r) for r in requests]
        while not all(s.done for s in seqs):
            self.step()
        return seqs

    # -- one step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Retire, admit, decode one token per running row, prefill within the budget.
        Returns the sequences that finished during this step."""
        with self.lock:
            finished: list[Sequence] = []
            self._take_inbox()
            self._retire_cancelled(finished)
            self._admit(finished)
            if self.decoding:
                rows = self.rows[: self.decoding]
                self._forward(rows, [[s.pending] for s in rows], finished)
            chunks = self._prefill_chunks()
            if chunks:
                self.stats.prompt_tokens += sum(len(c) for _, c in chunks)
                self._forward([s for s, _ in chunks], [c for _, c in chunks], finished)
            for seq in finished:
                if seq.slot >= 0:
                    self._release(seq)
            self.stats.steps += 1
            for seq in finished:
                self.stats.finished[seq.finish_reason] = self.stats.finished.get(seq.finish_reason, 0) + 1
            if not self.rows:  # idle: give the KV memory back
                for pool in self.pools:
                    pool.clear()
                self.adapter_slots.clear()
            return finished

    def abort_all(self, reason: str) -> list[Sequence]:
        """End every waiting and running row with an error and reset the KV memory (after a step
        failed midway, the rows' caches cannot be trusted). Returns the rows ended."""
        with self.lock:
            self._take_inbox()
            ended = [s for s in [*self.rows, *self.waiting] if not s.done]
            for s in ended:
                s.finish_reason, s.error = "error", reason
                s.slot = -1
            self.rows, self.waiting, self.decoding = [], deque(), 0
            for pool in self.pools:
                pool.clear()
            self.adapter_slots.clear()
            return ended

    def _take_inbox(self) -> None:
        while True:
            try:
                self.waiting.append(self.inbox.get_nowait())
            except queue.Empty:
                return

    def _retire_cancelled(self, finished: list[Sequence]) -> None:
        """Cancelled rows and rows past their deadline leave before this step's forwards."""
        now = time.monotonic()
        for seq in [*self.rows, *self.waiting]:
            if seq.cancelled:
                seq.finish_reason = "cancelled"
            elif seq.request.deadline is not None and now > seq.request.deadline:
                seq.finish_reason = "timeout"
            else:
                continue
            finished.append(seq)
            if seq.slot >= 0:
                self._release(seq)
        self.waiting = deque(s for s in self.waiting if not s.done)

    def _admit(self, finished: list[Sequence]) -> None:
        while self.waiting and len(self.rows) < self.max_rows:
            seq = self.waiting.popleft()
            r = seq.request
            if not r.prompt or len(r.prompt) + max(r.max_tokens, 1) > self.max_len:
                seq.finish_reason, seq.error = "error", (
                    f"prompt ({len(r.prompt)} tokens) plus max_tokens ({r.max_tokens}) exceeds the context of "
                    f"{self.max_len}" if r.prompt else "the prompt is empty")
                finished.append(seq)
                continue
            seq.generator = torch.Generator(device="cpu")
            seq.generator.manual_seed(r.seed if r.seed is not None else secrets.randbits(63))
            seq.slot = len(self.rows)
            self.rows.append(seq)
            name = r.label or ("adapter" if r.adapter is not None else "base")
            self.stats.adapter_rows[name] = self.stats.adapter_rows.get(name, 0) + 1
            if r.adapter is not None:
                if r.adapter.carryon.uses_cache:
                    slots = self.adapter_slots.setdefault(id(r.adapter), _AdapterSlots(self.max_len))
                    seq.adapter_slot = slots.take()

    def _prefill_chunks(self) -> list[tuple[Sequence, list[int]]]:
        """Prompt chunks for this step: prefilling rows in admission order until the token budget
        is spent (the first row always makes progress)."""
        budget, chunks = self.prefill_tokens, []
        for seq in self.rows[self.decoding:]:
            if budget <= 0:
                break
            if seq.done:
                continue
            take = min(len(seq.request.prompt) - seq.fed, budget)
            chunks.append((seq, seq.request.prompt[seq.fed : seq.fed + take]))
            budget -= take
        return chunks

    # -- the forward ----------------------------------------------------------------------------
    def _forward(self, seqs: list[Sequence], feeds: list[list[int]], finished: list[Sequence]) -> None:
        """One forward over `seqs` (a contiguous range of slots), feeding each its tokens; rows
        whose feed ends their prompt, and decoding rows, get a next token."""
        base, device = self.base, self.base.device
        B, T = len(seqs), max(len(f) for f in feeds)
        ids = torch.full((B, T), self.pad, dtype=torch.long)
        for i, f in enumerate(feeds):
            ids[i, : len(f)] = torch.tensor(f)
        starts = torch.tensor([s.fed for s in seqs])
        positions = (starts[:, None] + torch.arange(T)[None, :]).to(device)
        span = int(starts.max()) + T
        mask = step_mask(starts, T, span, device)
        slots = [s.slot for s in seqs]
        adapters = [s.request.adapter for s in seqs]
        shallow = sorted({k for a in adapters if a is not None for k in a.shallow})
        n_bases = max([1] + [a.num_bases for a in adapters if a is not None])
        # Rows of recycled-top adapters are adapted inside base 0's forward: their deltas bind to its top
        # blocks for this forward (one gathered matmul per layer for all of them; other rows untouched).
        groups: dict[int, list[int]] = {}
        for i, a in enumerate(adapters):
            if a is not None:
                groups.setdefault(id(a), []).append(i)
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
        self._sample([seqs[i] for i in want], logits, finished)

    @staticmethod
    def _alpha(seq: Sequence) -> float:
        """The row's alpha: its request's, else its adapter's own."""
        r = seq.request
        return r.adapter.alpha if r.alpha is None else r.alpha

    # -- sampling -------------------------------------------------------------------------------
    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, finished: list[Sequence]) -> None:
        """A next token per row, each with its own parameters and generator; whatever fails for
        one row (a broken adapter's NaN logits) ends that row alone."""
        greedy = torch.tensor([s.request.temperature < MIN_TEMPERATURE for s in seqs])
        best = logits.argmax(-1)
        now = time.monotonic()
        for j, seq in enumerate(seqs):
            r = seq.request
            try:
                row = logits[j]
                if torch.isnan(row).any() or not torch.isfinite(row).any():
                    raise FloatingPointError("the model produced NaN or no finite logit")
                token = int(best[j]) if greedy[j] else sample(row, r.temperature, r.top_p, seq.generator)
                if r.logprobs is not None:
                    lp = torch.log_softmax(row, -1)
                    entry = {"logprob": float(lp[token])}
                    if r.logprobs:
                        top = lp.topk(r.logprobs)
                        entry["top"] = list(zip(top.indices.tolist(), top.values.tolist()))
                    seq.logprobs.append(entry)
            except (RuntimeError, FloatingPointError, ValueError) as exc:
                seq.finish_reason, seq.error = "error", f"sampling failed: {exc}"
                finished.append(seq)
                continue
            if seq.first_token_at is None:
                seq.first_token_at = now
                i = seq.slot
                if i >= self.decoding:  # prompt done: move into the decoding range
                    self._swap(i, self.decoding)
                    self.decoding += 1
            seq.tokens.append(token)
            seq.pending = token
            self.stats.tokens += 1
            stop = False
            if r.on_token is not None:
                try:
                    stop = bool(r.on_token(seq, token))
                except Exception as exc:  # noqa: BLE001 - a callback's failure ends its own row only
                    seq.finish_reason, seq.error = "error", f"token callback failed: {exc}"
                    finished.append(seq)
                    continue
            if stop or (r.stop_at_eos and token == self.eos):
                seq.finish_reason = "stop"
            elif len(seq.tokens) >= r.max_tokens or seq.fed + 1 >= self.max_len:
                seq.finish_reason = "length"
            if seq.done:
                finished.append(seq)

    # -- slots ----------------------------------------------------------------------------------
    def _swap(self, i: int, j: int) -> None:
        if i == j:
            return
        a, b = self.rows[i], self.rows[j]
        upto = max(a.fed, b.fed)
        for pool in self.pools:
            pool.swap(i, j, upto)
        self.rows[i], self.rows[j] = b, a
        a.slot, b.slot = j, i

    def _release(self, seq: Sequence) -> None:
        """Take a row out of the running set, keeping decoding rows first and slots compact."""
        i = seq.slot
        if i < self.decoding:  # fill its place from the end of the decoding range ...
            self._swap(i, self.decoding - 1)
            self.decoding -= 1
            i = self.decoding
        self._swap(i, len(self.rows) - 1)  # ... and that place from the end of the prefilling range
        self.rows.pop()
        seq.slot = -1
        a = seq.request.adapter
        if a is not None and seq.adapter_slot >= 0:
            slots = self.adapter_slots.get(id(a))
            if slots is not None:
                slots.give(seq.adapter_slot)
            seq.adapter_slot = -1

    def kv_bytes(self) -> int:
        return sum(p.nbytes() for p in self.pools) + sum(s.pool.nbytes() for s in self.adapter_slots.values())


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
