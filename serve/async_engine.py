"""The model side of serving, free of Ray: one decode engine per replica, owned by one thread.

`AsyncEngine` (vLLM's AsyncLLM in miniature) holds the frozen base(s), tokenizes requests, loads
adapters, and runs the core's `Engine` (carryon_ray/engine/: iteration-level scheduling, per-row
KV memory, failures isolated per adapter) in a thread
that steps while any row is waiting or running. Requests come in from the replica's event loop
through `submit`, which returns a `Generation`: an async iterator of text deltas ending in the
result. Text comes out incrementally: `TextStream` turns token ids into text deltas, holding back
an unfinished UTF-8 character and any tail that could still become a stop string, and ends the row
when a stop string completes. A generation that is cancelled (client gone, request timed out)
frees its row at the engine's next step.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from carryon_ray.adapter import AdapterError
from carryon_ray.base import FrozenBase
from carryon_ray.engine import Engine, Request, Sequence, StepOutput
from carryon_ray.generation import Adapter

from .protocol import GenerateRequest, GenerateResult, ServeError, StreamDelta, TokenLogprob
from .settings import EngineConfig, LimitsConfig

log = logging.getLogger("carryon.serve")

# Buckets of the time-to-first-token histogram (seconds), for /metrics and Ray's metrics alike.
TTFT_BOUNDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class BesideBudget:
    """How much of a replica's time prompt-only work (a co-serving job's embedding chunks) may take
    while users' rows decode: `share` of the decode steps' time, measured, not guessed.

    A token bucket: every decode step adds `share` x its duration as credit (at most two steps'
    worth is kept, so an idle spell never buys a burst); an item runs when the credit covers its
    expected cost (its tokens x the measured seconds per token) and then pays what it actually
    took. Over any stretch of decoding the users lose at most about `share` of their step rate
    (0.5: each token at most 1.5x as slow), whatever the machine, base or batch. The chunk size
    follows too: about one step's share of tokens, between one row and `max_tokens`."""

    def __init__(self, share: float, max_tokens: int, decay: float = 0.8):
        self.share, self.max_tokens, self.decay = share, max_tokens, decay
        self.step_s: float | None = None  # moving average of a decode step
        self.s_per_token: float | None = None  # moving average of prompt-only seconds per token
        self.credit = 0.0
        self.busy_s = 0.0  # decode steps' time, and prompt-only time run while rows decoded
        self.beside_s = 0.0

    @staticmethod
    def _avg(old: float | None, new: float, decay: float) -> float:
        return new if old is None else decay * old + (1 - decay) * new

    def stepped(self, seconds: float) -> None:
        self.step_s = self._avg(self.step_s, seconds, self.decay)
        self.credit = min(self.credit + self.share * seconds, self._cap())
        self.busy_s += seconds

    def _cap(self) -> float:
        return 2 * self.share * (self.step_s or 0.0)

    def allows(self, tokens: int) -> bool:
        """May an item of `tokens` run after this step? Unknown costs run, to be measured; an item
        dearer than the most credit kept runs at that most and leaves a debt the next steps repay
        (one row cannot be split, and a job must not starve while users decode)."""
        if self.s_per_token is None:
            return True
        return self.credit >= min(tokens * self.s_per_token, self._cap())

    def spent(self, seconds: float, tokens: int, after_step: bool) -> None:
        """An item took `seconds`; `after_step`: it ran between decode steps (the users paid for
        it), not on an idle engine."""
        if tokens > 0:
            self.s_per_token = self._avg(self.s_per_token, seconds / tokens, self.decay)
        if after_step:
            self.credit -= seconds
            self.beside_s += seconds

    def chunk_tokens(self, busy: bool) -> int:
        if not busy or self.step_s is None or self.s_per_token is None:
            return self.max_tokens
        return int(max(1, min(self.max_tokens, self.share * self.step_s / self.s_per_token)))

    def share_used(self) -> float:
        """Prompt-only time run after decode steps over the decode steps' time, so far."""
        return self.beside_s / self.busy_s if self.busy_s else 0.0


class TextStream:
    """Token ids -> text deltas, with stop strings. `out` is exactly what was sent.

    Detokenization is incremental (as Hugging Face's streamers and vLLM do): each token decodes
    only the ids since the last settled point, so a row's cost per token stays constant instead of
    growing with its length. Runs on the replica's engine thread after each step, outside the
    engine's lock."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        # A stop string could begin in the last len-1 characters: hold those back until decided.
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.longest = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.count = 0  # tokens this stream consumed (the completion's token count)
        self._prefix, self._read = 0, 0  # ids[prefix:read] decode to the text's settled tail
        self.text = ""
        self.out = ""
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append a token; return the text that is now safe to send."""
        if self.stopped:
            return ""
        self.count += 1
        self.ids.append(token_id)
        self._settle(final=False)
        if self.stopped:
            return self.flush()
        safe = len(self.text) - self.hold
        if safe <= len(self.out):
            return ""
        delta = self.text[len(self.out) : safe]
        self.out += delta
        return delta

    def end(self) -> str:
        """The row ended at the end-of-sequence token: it counts, its text is empty."""
        if not self.stopped:
            self.count += 1
        return self.flush()

    def _settle(self, final: bool) -> None:
        """Move the ids decoded since the settled point into the text and look for stop strings.
        An unfinished multi-byte character waits for its next token, unless the row has ended
        (`final`): then its bytes read as U+FFFD, as a decode of all the row's ids gives (Hugging
        Face's TextStreamer sends them at its end too), so the text is always the decode of the tokens."""
        if self.stopped or self._read == len(self.ids):
            return
        before = self._decode(self.ids[self._prefix : self._read])
        now = self._decode(self.ids[self._prefix :])
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):
            searched = max(0, len(self.text) - self.longest)
            self.text += now[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
            for s in self.stop:
                at = self.text.find(s, searched)
                if at >= 0:
                    self.text, self.stopped = self.text[:at], True

    def flush(self) -> str:
        """The rest of the text (the row has ended)."""
        self._settle(final=True)
        delta = self.text[len(self.out) :]
        self.out += delta
        return delta


_END = object()


@dataclass
class Generation:
    """One request in flight, seen from the event loop: iterate for StreamDelta items (the last
    item is the GenerateResult); `cancel()` frees its row at the engine's next step."""

    prompt_tokens: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    seq: Sequence | None = None

    def push(self, item) -> None:  # from the engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def cancel(self) -> None:
        if self.seq is not None:
            self.seq.cancel()

    async def stream(self):
        while True:
            item = await self.queue.get()
            if isinstance(item, ServeError):
                raise item
            yield item
            if isinstance(item, GenerateResult):
                return

    async def result(self) -> GenerateResult:
        async for item in self.stream():
            if isinstance(item, GenerateResult):
                return item
        raise ServeError(500, "generation ended without a result", "server_error")


class AsyncEngine:
    def __init__(self, bases: list[FrozenBase], limits: LimitsConfig, engine: EngineConfig):
        self.bases, self.base = bases, bases[0]
        self.limits, self.cfg = limits, engine
        self.tokenizer = self.base.tokenizer
        self.engine = Engine(bases, max_rows=engine.max_rows, prefill_tokens=engine.prefill_tokens,
                             forward=engine.forward, prefill_tokens_decoding=engine.prefill_tokens_decoding)
        if not self.engine.flat and engine.forward == "flat":
            log.info("this base runs the padded forward (two per step with arrivals): %s", self.engine.padded_because)
        self.max_positions = self.engine.max_len
        self._pending: dict[int, tuple[Generation, TextStream]] = {}
        self._wake = threading.Event()
        self._stop = False
        self.ttft: deque[float] = deque(maxlen=1000)  # seconds from submission to first token, recent requests
        self.ttft_count = 0  # every request's, ever (readers keep their own position: nobody empties ttft)
        self.ttft_buckets = [0] * (len(TTFT_BOUNDS) + 1)  # cumulative histogram since start (Prometheus style)
        self.ttft_sum = 0.0
        # Prompt-only work beside the users' rows (co-serving: jobs' embedding chunks): run on the
        # engine thread, one item after each decode step, back to back only when no row waits or runs.
        self._beside: deque[tuple[Callable[[], Any], concurrent.futures.Future, int]] = deque()
        self.beside_done = 0
        self.beside_tokens = 0  # padded tokens of prompt-only work run, and when (wall clock) it first
        self.beside_span = [None, None]  # started and last ended: the jobs' throughput on this replica
        self.budget = BesideBudget(engine.embed_share, engine.embed_tokens)
        self._thread = threading.Thread(target=self._loop, name="carryon-engine", daemon=True)
        self._thread.start()

    # -- prompts ---------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int] | None = None, messages: list[dict] | None = None,
               max_tokens: int = 1) -> list[int]:
        """Token ids of a prompt (text or ids) or chat messages; ServeError 400 for anything the
        tokenizer refuses, an empty or over-long prompt, or one that leaves no room for max_tokens."""
        tok, param = self.tokenizer, "messages" if messages is not None else "prompt"
        try:
            if messages is not None:
                if not getattr(tok, "chat_template", None):
                    raise ServeError(400, "this base has no chat template; use /v1/completions", param="messages")
                text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                ids = tok(text, add_special_tokens=False)["input_ids"]
            elif isinstance(prompt, list):
                ids = list(prompt)
                bad = [t for t in ids if not 0 <= t < self.base.vocab_size]
                if bad:
                    raise ServeError(400, f"token id {bad[0]} is outside the vocabulary (0..{self.base.vocab_size - 1})",
                                     param="prompt")
            else:
                ids = tok(prompt)["input_ids"]
        except ServeError:
            raise
        except (TypeError, ValueError, UnicodeError) as exc:  # e.g. a lone surrogate in the text
            raise ServeError(400, f"the {param} cannot be tokenized ({type(exc).__name__}); send valid Unicode text",
                             param=param) from None
        if not ids:
            raise ServeError(400, "the prompt is empty", param=param)
        if len(ids) > self.limits.max_prompt_tokens:
            raise ServeError(400, f"the prompt has {len(ids)} tokens; the limit is {self.limits.max_prompt_tokens}",
                             param=param)
        if len(ids) + max_tokens > self.max_positions:
            raise ServeError(400, f"prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the base's "
                             f"context of {self.max_positions}", param="max_tokens")
        return ids

    # -- adapters --------------------------------------------------------------------------------
    def load_adapter(self, source: str) -> Adapter:
        """Load and check an adapter (fingerprint, checksum); AdapterError if it cannot serve."""
        try:
            return Adapter.load(self.bases, source)
        except AdapterError:
            raise
        except Exception as exc:  # registry download failures, missing directories
            raise AdapterError(f"adapter cannot be fetched: {type(exc).__name__}: {exc}") from None

    # -- generation ------------------------------------------------------------------------------
    def submit(self, req: GenerateRequest, ids: list[int], adapter: Adapter | None) -> Generation:
        """Queue one row; the returned Generation streams its text (call from the event loop)."""
        waiting = self.engine.queued()
        if waiting >= self.cfg.max_waiting and len(self.engine.rows) >= self.cfg.max_rows:
            raise ServeError(503, "this replica's queue is full; retry shortly", "server_error", code="overloaded",
                             retry_after=2)
        gen = Generation(len(ids), asyncio.get_running_loop())
        request = Request(ids, adapter, req.max_tokens, req.temperature, req.top_p, req.seed, req.alpha,
                          stop_at_eos=not req.ignore_eos, logprobs=req.logprobs,
                          deadline=time.monotonic() + self.limits.request_timeout_s, label=req.model,
                          presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                          repetition_penalty=req.repetition_penalty)
        seq = self.engine.submit(request)
        gen.seq = seq
        self._pending[seq.id] = (gen, TextStream(self.tokenizer, req.stop))
        self._wake.set()
        return gen

    def _emit(self, seq: Sequence, token: int) -> None:
        """One token of a row, as text (after the step, outside the engine's lock). A completed stop
        string ends the row at the engine's next step."""
        gen, text = self._pending.get(seq.id, (None, None))
        if gen is None or text.stopped:
            return
        if token == self.engine.eos and seq.request.stop_at_eos:
            delta = text.end()
        else:
            delta = text.add(token)
        if delta:
            gen.push(StreamDelta(text=delta))
        if text.stopped:
            seq.stop()

    def _deliver(self, seq: Sequence) -> None:
        gen, text = self._pending.pop(seq.id, (None, None))
        if gen is None:
            return
        if seq.first_token_at is not None:
            t = seq.first_token_at - seq.submitted
            self.ttft.append(t)
            self.ttft_count += 1
            self.ttft_sum += t
            self.ttft_buckets[bisect.bisect_left(TTFT_BOUNDS, t)] += 1
        if seq.finish_reason == "error":
            gen.push(ServeError(500, f"generation failed for this request: {seq.error}", "server_error"))
            return
        if seq.finish_reason == "timeout":
            gen.push(ServeError(504, f"generation took longer than limits.request_timeout_s "
                                     f"({self.limits.request_timeout_s:g}s)", "server_error", code="timeout"))
            return
        tail = text.flush()
        if tail:
            gen.push(StreamDelta(text=tail))
        logprobs = None
        if seq.request.logprobs is not None:
            dec = lambda t: self.tokenizer.decode([t])  # noqa: E731
            logprobs = [TokenLogprob(token=dec(t), id=t, logprob=e["logprob"],
                                     top=[(dec(i), lp) for i, lp in e.get("top", [])])
                        for t, e in zip(seq.tokens[: text.count], seq.logprobs)]
        reason = "length" if seq.finish_reason == "length" and not text.stopped else "stop"
        gen.push(GenerateResult(text=text.out, finish_reason=reason, prompt_tokens=len(seq.request.prompt),
                                completion_tokens=text.count, logprobs=logprobs))

    def run_beside(self, fn: Callable[[], Any], tokens: int = 0) -> asyncio.Future:
        """`fn()` on the engine thread at the lowest priority: after a decode step, never inside
        one, and while rows decode only as the step-time budget allows (BesideBudget), so users
        pay at most EngineConfig.embed_share of each step for it. `tokens`: the padded tokens `fn`
        runs through the base (how its cost is learned; size chunks by `beside_chunk_tokens`).
        The model is the engine's; only this thread runs it."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._beside.append((fn, fut, tokens))
        self._wake.set()
        return asyncio.wrap_future(fut)

    def beside_chunk_tokens(self) -> int:
        """Padded tokens for the next chunk of prompt-only work: about one step's share while
        rows decode, EngineConfig.embed_tokens when the engine is idle."""
        return self.budget.chunk_tokens(busy=self.engine.has_work())

    def _run_beside(self, after_step: bool) -> None:
        fn, fut, tokens = self._beside.popleft()
        if not fut.set_running_or_notify_cancel():  # its caller gave up
            return
        t0 = time.perf_counter()
        if self.beside_span[0] is None:
            self.beside_span[0] = time.time()
        try:
            result, error = fn(), None
        except BaseException as exc:  # noqa: BLE001 - the caller gets it; the engine goes on
            result, error = None, exc
        self.budget.spent(time.perf_counter() - t0, tokens, after_step)
        self.beside_done += 1  # counted before the caller wakes
        self.beside_tokens += tokens if error is None else 0
        self.beside_span[1] = time.time()
        if error is None:
            fut.set_result(result)
        else:
            fut.set_exception(error)

    def _loop(self) -> None:
        while not self._stop:
            if not self.engine.has_work():
                if self._beside:
                    self._run_beside(after_step=False)
                    continue
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            t_step = time.perf_counter()
            try:
                step = self.engine.step()
            except Exception:  # noqa: BLE001 - a failed step fails the rows in it; the replica stays up
                log.exception("decode step failed; ending the requests in flight")
                step = StepOutput(finished=self.engine.abort_all("the decode step failed"))
            # Text and delivery happen here, after the step: the engine's lock is free again.
            for seq, token in step.tokens:
                try:
                    self._emit(seq, token)
                except Exception as exc:  # noqa: BLE001 - a row whose text fails ends alone, as an error
                    log.exception("detokenizing a row failed")
                    seq.fail(f"detokenizing failed: {type(exc).__name__}: {exc}")
                    _, text = self._pending.get(seq.id, (None, None))
                    if text is not None:  # no more text for it: the error is what its client gets
                        text.stopped = True
            for seq in step.finished:
                self._deliver(seq)
            self.budget.stepped(time.perf_counter() - t_step)
            # Users' tokens come first: at most one item of prompt-only work after a step, and only
            # when the steps' accumulated share covers its expected cost.
            if self._beside and self.budget.allows(self._beside[0][2]):
                self._run_beside(after_step=True)

    def stats(self) -> dict:
        """The one snapshot of this replica's engine: /v1/carryon/stats and the Prometheus metrics
        both read it (`ttft_recent_s` holds the latest TTFTs, `ttft_count` how many there ever were)."""
        e = self.engine
        with e.lock:
            ttft = sorted(self.ttft)
            return {"running_rows": len(e.rows), "decoding_rows": e.decoding,
                    "waiting": e.queued(), "steps": e.stats.steps, "base_forwards": e.stats.forwards,
                    "forward": "flat" if e.flat else f"padded ({e.padded_because})",
                    "generated_tokens": e.stats.tokens, "prompt_tokens": e.stats.prompt_tokens,
                    "finished": dict(e.stats.finished), "adapter_rows": dict(e.stats.adapter_rows),
                    "kv_bytes": e.kv_bytes(), "max_rows": e.max_rows,
                    "beside_waiting": len(self._beside), "beside_done": self.beside_done,
                    "beside_tokens": self.beside_tokens, "beside_first_at": self.beside_span[0],
                    "beside_last_at": self.beside_span[1],
                    "beside_share": round(self.budget.share_used(), 4),
                    "ttft_p50_s": ttft[len(ttft) // 2] if ttft else None,
                    "ttft_count": self.ttft_count, "ttft_sum_s": round(self.ttft_sum, 6),
                    "ttft_buckets": dict(zip([*map(str, TTFT_BOUNDS), "+Inf"], itertools.accumulate(self.ttft_buckets)))}

    def close(self) -> None:
        self._stop = True
        self._wake.set()
