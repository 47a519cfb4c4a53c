"""KV memory: the base's slot pools and each cache-keeping adapter's own.

One `KVPool` per base holds every running row's keys and values at their own positions. We chose
a slot pool over paged blocks because torch on CPU has no paged-attention kernel: with slots, the
decode rows of a step are a contiguous range of the pool (the scheduler keeps running rows
compacted, decoding rows first), so attention reads the cache in place; admitting a row writes
only its own slot, and retiring one moves at most two rows. The pool grows by doubling (rows, then
positions) up to the base's context and is released when the engine goes idle.

A transformer carry-on keeps its own (small) cache: `AdapterPools` gives each such adapter a pool
and a free list, held by the adapter object itself as the key of a weak mapping (never by `id()`,
which a later adapter can reuse) and dropped as soon as the adapter has no row running.
"""

from __future__ import annotations

import weakref

import torch


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


class AdapterSlots:
    """The KV pool of one cache-keeping adapter and which of its slots are free."""

    def __init__(self, max_len: int):
        self.pool = KVPool(max_len)
        self.free: list[int] = []
        self.used = 0  # slots ever handed out (the pool's extent)

    @property
    def live(self) -> int:
        return self.used - len(self.free)

    def take(self) -> int:
        if self.free:
            return self.free.pop()
        self.used += 1
        return self.used - 1

    def give(self, slot: int) -> None:
        self.free.append(slot)


class AdapterPools:
    """adapter -> AdapterSlots for every cache-keeping adapter with rows running. Keyed weakly by the
    adapter object: an adapter evicted from the replica's LRU cannot leave a pool behind for a later
    one, and a pool goes as soon as its last row is released."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self._pools: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def take(self, adapter) -> int:
        slots = self._pools.get(adapter)
        if slots is None:
            slots = self._pools[adapter] = AdapterSlots(self.max_len)
        return slots.take()

    def give(self, adapter, slot: int) -> None:
        slots = self._pools.get(adapter)
        if slots is None:
            return
        slots.give(slot)
        if not slots.live:
            del self._pools[adapter]

    def pool(self, adapter) -> KVPool:
        return self._pools[adapter].pool

    def __len__(self) -> int:
        return len(self._pools)

    def live(self) -> int:
        return sum(s.live for s in self._pools.values())

    def clear(self) -> None:
        self._pools.clear()

    def nbytes(self) -> int:
        return sum(s.pool.nbytes() for s in self._pools.values())
