"""The model side of serving, free of Ray: one decode engine per replica, owned by one thread.

`ServingEngine` holds the frozen base(s), tokenizes requests, loads adapters, and runs the core's
`Engine` (carryon_ray/generation.py: iteration-level scheduling, per-row KV memory) in a thread
that steps while any row is waiting or running. Requests come in from the replica's event loop
through `submit`, which returns a `Generation`: an async iterator of text deltas ending in the
result. Text comes out incrementally: `TextStream` turns token ids into text deltas, holding back
an unfinished UTF-8 character and any tail that could still become a stop string, and ends the row
when a stop string completes. A generation that is cancelled (client gone, request timed out)
frees its row at the engine's next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from carryon_ray.adapter import AdapterError
from carryon_ray.base import FrozenBase
from carryon_ray.generation import Adapter, Engine, Request, Sequence

from .protocol import GenerateRequest, GenerateResult, ServeError, StreamDelta, TokenLogprob
from .settings import EngineConfig, LimitsConfig

log = logging.getLogger("carryon.serve")


class TextStream:
    """Token ids -> text deltas, with stop strings. `out` is exactly what was sent."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        # A stop string could begin in the last len-1 characters: hold those back until decided.
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.out = ""
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append a token; return the text that is now safe to send."""
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                text, self.stopped = text[:at], True
        self.text = text
        if self.stopped:
            return self.flush()
        if not text.startswith(self.out):  # the decoder revised earlier text; wait for it to settle
            return ""
        safe = len(text) - self.hold
        while safe > len(self.out) and text[safe - 1] == "\ufffd":  # an unfinished multi-byte character
            safe -= 1
        if safe <= len(self.out):
            return ""
        delta = text[len(self.out) : safe]
        self.out += delta
        return delta

    def flush(self) -> str:
        """The rest of the text (the row has ended)."""
        delta = self.text[len(self.out) :] if self.text.startswith(self.out) else ""
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


class ServingEngine:
    def __init__(self, bases: list[FrozenBase], limits: LimitsConfig, engine: EngineConfig):
        self.bases, self.base = bases, bases[0]
        self.limits, self.cfg = limits, engine
        self.tokenizer = self.base.tokenizer
        self.engine = Engine(bases, max_rows=engine.max_rows, prefill_tokens=engine.prefill_tokens)
        self.max_positions = self.engine.max_len
        self._pending: dict[int, tuple[Generation, TextStream]] = {}
        self._wake = threading.Event()
        self._stop = False
        self.ttft: list[float] = []  # seconds from submission to first token, recent requests
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
        waiting = self.engine.inbox.qsize() + len(self.engine.waiting)
        if waiting >= self.cfg.max_waiting and len(self.engine.rows) >= self.cfg.max_rows:
            raise ServeError(503, "this replica's queue is full; retry shortly", "server_error", code="overloaded",
                             retry_after=2)
        gen = Generation(len(ids), asyncio.get_running_loop())
        text = TextStream(self.tokenizer, req.stop)

        def on_token(seq: Sequence, token: int) -> bool:
            if token == self.engine.eos and seq.request.stop_at_eos:
                delta = text.flush()
            else:
                delta = text.add(token)
            if delta:
                gen.push(StreamDelta(text=delta))
            return text.stopped

        request = Request(ids, adapter, req.max_tokens, req.temperature, req.top_p, req.seed, req.alpha,
                          stop_at_eos=not req.ignore_eos, logprobs=req.logprobs, deadline=time.monotonic() + self.limits.request_timeout_s,
                          on_token=on_token, label=req.model)
        seq = self.engine.submit(request)
        gen.seq = seq
        self._pending[seq.id] = (gen, text)
        self._wake.set()
        return gen

    def _deliver(self, seq: Sequence) -> None:
        gen, text = self._pending.pop(seq.id, (None, None))
        if gen is None:
            return
        if seq.first_token_at is not None:
            self.ttft.append(seq.first_token_at - seq.submitted)
            del self.ttft[:-1000]
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
                        for t, e in zip(seq.tokens, seq.logprobs)]
        reason = "length" if seq.finish_reason == "length" else "stop"
        gen.push(GenerateResult(text=text.out, finish_reason=reason, prompt_tokens=len(seq.request.prompt),
                                completion_tokens=len(seq.tokens), logprobs=logprobs))

    def _loop(self) -> None:
        while not self._stop:
            if not self.engine.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                finished = self.engine.step()
            except Exception:  # noqa: BLE001 - a failed step fails the rows in it; the replica stays up
                log.exception("decode step failed; ending the requests in flight")
                finished = self.engine.abort_all("the decode step failed")
            for seq in finished:
                self._deliver(seq)

    def stats(self) -> dict:
        e = self.engine
        with e.lock:
            ttft = sorted(self.ttft)
            return {"running_rows": len(e.rows), "decoding_rows": e.decoding,
                    "waiting": len(e.waiting) + e.inbox.qsize(), "steps": e.stats.steps,
                    "generated_tokens": e.stats.tokens, "prompt_tokens": e.stats.prompt_tokens,
                    "finished": dict(e.stats.finished), "adapter_rows": dict(e.stats.adapter_rows),
                    "kv_bytes": e.kv_bytes(), "max_rows": e.max_rows,
                    "ttft_p50_s": ttft[len(ttft) // 2] if ttft else None}

    def close(self) -> None:
        self._stop = True
        self._wake.set()
