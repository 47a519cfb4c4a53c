"""The decode engine: iteration-level scheduling over one base (or several, for mixed-base adapters).

Each `step()` is schedule -> execute -> update, as in vLLM v1 (Orca's iteration-level scheduling,
OSDI '22): the scheduler (scheduler.py, no tensors) retires ended rows, admits waiting ones and
plans every decoding row's next token plus prompt chunks within a token budget; the model runner
(runner.py) runs all of them through the base and each row's carry-on to logits; the sampler
(sampler.py) picks a token per row; the scheduler's `update` records it and finishes rows. The step
returns its tokens and ended rows as events; text is made from them after the step, outside the lock.

One user's adapter never fails another's request. When the runner raises, the step runs again one
adapter group at a time (the bare base's rows are a group too) and only the group that raises ends,
with its reason; the runner changes no row's bookkeeping, so a re-run is safe. A row's sampling
failure (NaN logits) ends that row alone, and every row that ended is delivered exactly once, even
when a step fails midway (the scheduler's outbox outlives it).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from .runner import ModelRunner, adapter_groups
from .sampler import Sampler
from .scheduler import Chunk, Request, Scheduler, Sequence, StepPlan

log = logging.getLogger("carryon.engine")


@dataclass
class EngineStats:
    steps: int = 0
    tokens: int = 0  # generated
    prompt_tokens: int = 0  # prefilled
    forwards: int = 0  # base forwards (one per step with the flat layer loop; up to two without)
    finished: dict = field(default_factory=dict)  # finish_reason -> count
    adapter_rows: dict = field(default_factory=dict)  # adapter name -> rows admitted
    isolated: int = 0  # steps re-run per adapter group after a failure


@dataclass
class StepOutput:
    """What one step produced: every sampled token (row, token id) in order, and the rows that ended.
    The caller turns tokens into text after the step, outside the engine's lock."""

    tokens: list[tuple[Sequence, int]] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


class Engine:
    """Schedule, execute, update, one step at a time. Thread-safe only in `submit` and
    `Sequence.cancel/stop/fail`: one thread calls `step()` (serve/async_engine.py runs that loop for a
    Serve replica; `run` does it for offline generation)."""

    def __init__(self, bases, max_rows: int = 32, prefill_tokens: int = 512, max_len: int | None = None,
                 forward: str = "flat", prefill_tokens_decoding: int | None = None):
        self.bases = bases if isinstance(bases, list) else [bases]
        base = self.base = self.bases[0]
        context = int(getattr(base.model.config, "max_position_embeddings", 0) or 1 << 20)
        self.max_len = min(max_len or context, context)
        self.eos = base.tokenizer.eos_token_id
        self.runner = ModelRunner(self.bases, self.max_len, forward)
        self.scheduler = Scheduler(max_rows, prefill_tokens, self.max_len, on_swap=self.runner.swap,
                                   prefill_tokens_decoding=prefill_tokens_decoding, eos=self.eos,
                                   on_free=self.runner.free)
        self.sampler = Sampler()
        self.stats = EngineStats()
        self.lock = threading.Lock()  # held for the length of a step (stats readers take it too)

    # -- the scheduler's and runner's state, read by the replica's stats ------------------------------
    max_rows = property(lambda self: self.scheduler.max_rows)
    rows = property(lambda self: self.scheduler.rows)
    decoding = property(lambda self: self.scheduler.decoding)
    flat = property(lambda self: self.runner.flat)
    padded_because = property(lambda self: self.runner.padded_because)

    def queued(self) -> int:
        return self.scheduler.queued()

    def kv_bytes(self) -> int:
        return self.runner.kv_bytes()

    # -- requests -------------------------------------------------------------------------------------
    def submit(self, request: Request) -> Sequence:
        """Queue a request (thread-safe); it is admitted at a coming step."""
        return self.scheduler.submit(request)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self.scheduler.finished)

    def run(self, requests: list[Request], progress=None, desc: str = "decode steps") -> list[Sequence]:
        """Offline: submit everything, step until all are done, return the sequences in order.
        `progress` (carryon_ray.progress's Progress) wraps the steps; their total is the longest
        request's tokens plus its prompt's prefill chunks, fewer when rows stop early."""
        seqs = [self.submit(r) for r in requests]

        def steps():
            while not all(s.done for s in seqs):
                self.step()
                yield

        chunks = max((-(-len(r.prompt) // self.scheduler.prefill_tokens) for r in requests), default=0)
        total = max((r.max_tokens for r in requests), default=0) + chunks
        for _ in (progress(steps(), desc, total) if progress else steps()):
            pass
        return seqs

    # -- one step -------------------------------------------------------------------------------------
    @torch.inference_mode()  # the KV pools are inference tensors: the update's slot swaps write them too
    def step(self) -> StepOutput:
        """Schedule, execute, sample, update. Returns the step's tokens and the rows that ended."""
        with self.lock:
            out = StepOutput()
            plan = self.scheduler.schedule()
            for seq in plan.admitted:
                self._admitted(seq)
            if not plan.empty:
                self.stats.prompt_tokens += sum(len(c.tokens) for c in plan.prefill)
                seqs, logits = self._execute(plan)
                for s in plan.decode:
                    if not s.done:
                        s.fed += 1
                for c in plan.prefill:
                    if not c.seq.done:
                        c.seq.fed += len(c.tokens)
                self._sample(seqs, logits, out)
            self.stats.steps += 1
            self.stats.forwards = self.runner.forwards
            out.finished = self.scheduler.take_finished()
            for seq in out.finished:
                self.stats.finished[seq.finish_reason] = self.stats.finished.get(seq.finish_reason, 0) + 1
            if not self.rows:  # idle: give the KV memory back
                self.runner.clear()
            return out

    def abort_all(self, reason: str) -> list[Sequence]:
        """End every waiting and running row with an error and reset the KV memory (after a step failed
        outside the model, the rows' state cannot be trusted). Returns the rows ended, with any that
        had ended before and were not yet handed out."""
        with self.lock:
            ended = self.scheduler.abort_all(reason)
            self.runner.clear()
            return ended

    def _admitted(self, seq: Sequence) -> None:
        r = seq.request
        if r.seed is not None:  # a seeded row owns its generator (same seed, same tokens, whatever else runs)
            seq.generator = torch.Generator(device="cpu")
            seq.generator.manual_seed(r.seed)
        name = r.label or ("adapter" if r.adapter is not None else "base")
        self.stats.adapter_rows[name] = self.stats.adapter_rows.get(name, 0) + 1
        self.runner.admitted(seq)

    def _execute(self, plan: StepPlan) -> tuple[list[Sequence], torch.Tensor]:
        """The runner on the whole plan; if it raises, on each adapter group alone, ending only the
        rows of a group that raises (with its reason)."""
        try:
            return self.runner.execute(plan.decode, plan.prefill)
        except Exception as exc:  # noqa: BLE001 - isolated below; whatever fails again ends its own rows
            first = exc
        self.stats.isolated += 1
        rows = [*plan.decode, *(c.seq for c in plan.prefill)]
        chunk_of = {c.seq.id: c for c in plan.prefill}
        seqs, logits = [], []
        for adapter, idx in adapter_groups(rows).items():
            group = [rows[i] for i in idx]
            decode = [s for s in group if s.id not in chunk_of]
            chunks: list[Chunk] = [chunk_of[s.id] for s in group if s.id in chunk_of]
            try:
                got, lg = self.runner.execute(decode, chunks)
            except Exception as exc:  # noqa: BLE001 - this group's rows end; the others go on
                name = group[0].request.label or ("the base" if adapter is None else "its adapter")
                log.warning("a step failed for %d row(s) of %s: %s", len(group), name, _describe(exc))
                for s in group:
                    self.scheduler.finish(s, "error", f"the model failed for this request's adapter: {_describe(exc)}")
                continue
            seqs += got
            logits.append(lg)
        log.info("step re-run per adapter group after: %s", _describe(first))
        return seqs, torch.cat(logits) if logits else torch.empty(0, self.base.vocab_size)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, out: StepOutput) -> None:
        """A next token per row (the Sampler), then the scheduler's update; a row whose sampling
        fails (a broken adapter's NaN logits) ends alone."""
        if not seqs:
            return
        picked = self.sampler(seqs, logits)
        now = time.monotonic()
        for seq, (token, entry, error) in zip(seqs, picked):
            if error is not None:
                self.scheduler.finish(seq, "error", f"sampling failed: {error}")
                continue
            if entry is not None:
                seq.logprobs.append(entry)
            if seq.first_token_at is None:
                seq.first_token_at = now
            self.stats.tokens += 1
            out.tokens.append((seq, token))
            self.scheduler.update(seq, token)
