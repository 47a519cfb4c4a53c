"""What runs at each engine step, decided without a model: requests, their rows, and the step plan.

The engine's step is schedule -> execute -> update (vLLM v1's shape). This module is the first
and the last: `Scheduler.schedule()` takes new requests from the inbox, retires cancelled, stopped,
failed and timed-out rows, admits waiting rows while there is room, and returns a `StepPlan`: every
decoding row's next token first, then prompt chunks of prefilling rows in admission order within
the step's prompt-token budget (the first prefilling row always makes progress, so a long prompt
is never starved). The budget is `prefill_tokens` when nothing decodes and the smaller
`prefill_tokens_decoding` when rows do: on a CPU each prompt token of a step costs about 1/50 of a
16-row decode step, so the second budget bounds how much a long prompt slows everyone's next token. After the model
runner and the sampler, `update(seq, token)` records each sampled token and decides whether the row
is finished (end of sequence, max_tokens, the context), as vLLM's `check_stop` does; `fail` ends a
row with an error. The scheduler owns finishing: every row that ends, however it ends, goes through
`release` (which gives back its KV memory through `on_free`) and into `finished`, an outbox the
engine drains once per step, so a step that raises midway loses no ended row.

Rows live in slots: `rows[i].slot == i`, decoding rows first (`rows[:decoding]`), then rows still
prefilling, so a step's decode tokens read a contiguous range of the KV pool. Keeping that order
takes slot swaps, which the scheduler asks of whoever owns the KV memory through `on_swap(i, j,
upto)`; the scheduler itself holds no tensor, which is why its tests need no model.

Thread safety: `submit` and `Sequence.cancel/stop/fail` may be called from any thread (they only
set flags or put into a queue); everything else runs on the engine's thread.
"""

from __future__ import annotations

import itertools
import queue
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Request:
    """What one generation asks for."""

    prompt: list[int]
    adapter: object | None = None  # generation.Adapter; None = the bare base
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None  # None: fresh entropy for every request
    alpha: float | None = None  # None: the adapter's own alpha
    stop_at_eos: bool = True
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: also the top k
    deadline: float | None = None  # time.monotonic() after which the row is retired ("timeout")
    label: str = ""  # the adapter's public name, for per-adapter counts
    presence_penalty: float = 0.0  # OpenAI: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # CTRL / HF / vLLM: logits of prompt and generated tokens / p (or * p if < 0)


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
    stop_requested: bool = False
    failed: str | None = None  # set by fail(): the error the row ends with
    slot: int = -1  # index into the engine's running rows (and the base KV pools)
    adapter_slot: int = -1  # slot in the adapter's own KV pool
    fed: int = 0  # positions in the KV cache
    pending: int | None = None  # the last sampled token, not yet fed
    generator: object | None = None  # torch.Generator of a seeded row

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def decoding(self) -> bool:
        return self.pending is not None

    def cancel(self) -> None:
        """Ask the engine to retire this row at its next step (thread-safe)."""
        self.cancelled = True

    def fail(self, error: str) -> None:
        """End this row with an error at the engine's next step (thread-safe): its client gets the
        error, not a truncated success (e.g. its text could not be detokenized)."""
        self.failed = error

    def stop(self) -> None:
        """End this row as finished ("stop") at the next step: a stop string completed (thread-safe)."""
        self.stop_requested = True


@dataclass
class Chunk:
    """Prompt tokens of one prefilling row fed at this step, from position `start`."""

    seq: Sequence
    start: int
    tokens: list[int]

    @property
    def completes_prompt(self) -> bool:
        return self.start + len(self.tokens) == len(self.seq.request.prompt)


@dataclass
class StepPlan:
    """One step: decode rows (one token each, slots 0..len-1), then prompt chunks; rows admitted and
    rows that finished before any forward (cancelled, stopped, timed out, refused at admission)."""

    decode: list[Sequence] = field(default_factory=list)
    prefill: list[Chunk] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


class Scheduler:
    """Inbox, waiting queue and running rows of one engine. Thread-safe only in `submit` and
    `Sequence.cancel/stop`; everything else runs on the engine's thread."""

    def __init__(self, max_rows: int, prefill_tokens: int, max_len: int,
                 on_swap: Callable[[int, int, int], None] | None = None, prefill_tokens_decoding: int | None = None,
                 eos: int | None = None, on_free: Callable[[Sequence], None] | None = None):
        self.max_rows, self.prefill_tokens, self.max_len = max_rows, max(1, prefill_tokens), max_len
        self.eos = eos
        self.on_free = on_free or (lambda seq: None)  # the row's KV memory outside the base pools (adapter caches)
        self.finished: list[Sequence] = []  # ended rows not yet handed out (take_finished)
        # While rows decode, every prompt token of a step delays their next token: a smaller budget then.
        self.prefill_tokens_decoding = max(1, min(prefill_tokens_decoding or self.prefill_tokens, self.prefill_tokens))
        self.on_swap = on_swap or (lambda i, j, upto: None)
        self.inbox: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        self.waiting: deque[Sequence] = deque()
        self.rows: list[Sequence] = []  # running, in slot order: decoding rows first, then prefilling
        self.decoding = 0  # rows[:decoding] decode; rows[decoding:] are still prefilling

    def submit(self, request: Request) -> Sequence:
        seq = Sequence(request)
        self.inbox.put(seq)
        return seq

    def has_work(self) -> bool:
        return bool(self.rows or self.waiting or not self.inbox.empty())

    def queued(self) -> int:
        return len(self.waiting) + self.inbox.qsize()

    # -- schedule --------------------------------------------------------------------------------
    def schedule(self, now: float | None = None) -> StepPlan:
        plan = StepPlan()
        self._take_inbox()
        self._retire(plan.finished, time.monotonic() if now is None else now)
        self._admit(plan)
        self.finished += plan.finished
        plan.decode = list(self.rows[: self.decoding])
        budget = self.prefill_tokens_decoding if plan.decode else self.prefill_tokens
        for seq in self.rows[self.decoding :]:
            if budget <= 0:
                break
            take = min(len(seq.request.prompt) - seq.fed, budget)
            plan.prefill.append(Chunk(seq, seq.fed, seq.request.prompt[seq.fed : seq.fed + take]))
            budget -= take
        return plan

    def _take_inbox(self) -> None:
        while True:
            try:
                self.waiting.append(self.inbox.get_nowait())
            except queue.Empty:
                return

    def _retire(self, finished: list[Sequence], now: float) -> None:
        """Failed, cancelled, stopped and timed-out rows leave before this step's forward."""
        for seq in [*self.rows, *self.waiting]:
            if seq.failed is not None:
                seq.finish_reason, seq.error = "error", seq.failed
            elif seq.cancelled:
                seq.finish_reason = "cancelled"
            elif seq.stop_requested:
                seq.finish_reason = "stop"
            elif seq.request.deadline is not None and now > seq.request.deadline:
                seq.finish_reason = "timeout"
            else:
                continue
            finished.append(seq)
            if seq.slot >= 0:
                self.release(seq)
        self.waiting = deque(s for s in self.waiting if not s.done)

    def _admit(self, plan: StepPlan) -> None:
        while self.waiting and len(self.rows) < self.max_rows:
            seq = self.waiting.popleft()
            r = seq.request
            if not r.prompt or len(r.prompt) + max(r.max_tokens, 1) > self.max_len:
                seq.finish_reason, seq.error = "error", (
                    f"prompt ({len(r.prompt)} tokens) plus max_tokens ({r.max_tokens}) exceeds the context of "
                    f"{self.max_len}" if r.prompt else "the prompt is empty")
                plan.finished.append(seq)
                continue
            seq.slot = len(self.rows)
            self.rows.append(seq)
            plan.admitted.append(seq)

    # -- update ----------------------------------------------------------------------------------
    def update(self, seq: Sequence, token: int) -> bool:
        """The row's next token was sampled: record it, and finish the row at the end-of-sequence
        token, at max_tokens or at the context's end. Returns whether it finished."""
        r = seq.request
        if seq.pending is None:
            self.started_decoding(seq)
        seq.tokens.append(token)
        seq.pending = token
        if r.stop_at_eos and token == self.eos:
            seq.finish_reason = "stop"
        elif len(seq.tokens) >= r.max_tokens or seq.fed + 1 >= self.max_len:
            seq.finish_reason = "length"
        else:
            return False
        self.finish(seq)
        return True

    def finish(self, seq: Sequence, reason: str | None = None, error: str | None = None) -> None:
        """End a running row (with `reason` and `error` when given): out of the running set, into the outbox."""
        if reason is not None:
            seq.finish_reason, seq.error = reason, error
        if seq.slot >= 0:
            self.release(seq)
        self.finished.append(seq)

    def take_finished(self) -> list[Sequence]:
        """The rows that ended since the last call (each exactly once)."""
        out, self.finished = self.finished, []
        return out

    def started_decoding(self, seq: Sequence) -> None:
        """The row's prompt is in and its first token sampled: it joins the decoding range."""
        if seq.slot >= self.decoding:
            self._swap(seq.slot, self.decoding)
            self.decoding += 1

    def release(self, seq: Sequence) -> None:
        """Take a row out of the running set, keeping decoding rows first and slots compact (at most
        two swaps)."""
        i = seq.slot
        if i < self.decoding:  # fill its place from the end of the decoding range ...
            self._swap(i, self.decoding - 1)
            self.decoding -= 1
            i = self.decoding
        self._swap(i, len(self.rows) - 1)  # ... and that place from the end of the prefilling range
        self.rows.pop()
        seq.slot = -1
        self.on_free(seq)

    def abort_all(self, reason: str) -> list[Sequence]:
        """End every waiting and running row with `reason` as its error; returns them with the rows
        that had already ended and were not yet handed out."""
        self._take_inbox()
        for s in [*self.rows, *self.waiting]:
            if not s.done:
                s.finish_reason, s.error = "error", reason
            if s.slot >= 0:
                s.slot = -1
                self.on_free(s)
            self.finished.append(s)
        self.rows, self.waiting, self.decoding = [], deque(), 0
        return self.take_finished()

    def _swap(self, i: int, j: int) -> None:
        if i == j:
            return
        a, b = self.rows[i], self.rows[j]
        self.on_swap(i, j, max(a.fed, b.fed))
        self.rows[i], self.rows[j] = b, a
        a.slot, b.slot = j, i
