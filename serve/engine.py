"""The model side of serving, free of Ray: tokenization, adapters, and one batched generation.

A replica owns one `Engine`: the frozen base (loaded once), the chat template, and `run(rows)`,
which decodes a batch of requests that may each name a different adapter through
`generate_mixed` (one base forward per step for the whole batch). Text comes out incrementally:
`TextStream` turns token ids into text deltas, holding back an unfinished UTF-8 character and any
tail that could still become a stop string, and ends the row when a stop string completes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from carryon_ray.adapter import AdapterError
from carryon_ray.base import FrozenBase
from carryon_ray.generation import Adapter, generate_mixed

from .settings import LimitsConfig


class RequestError(ValueError):
    """A request the engine refuses (answered as 4xx with this message)."""


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


@dataclass
class Row:
    """One request in a batch and, after `Engine.run`, its result."""

    prompt_ids: list[int]
    adapter: Adapter | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    alpha: float | None = None
    stop: list[str] = field(default_factory=list)
    on_text: Callable[[str], None] | None = None  # called from the generation thread
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None


class Engine:
    def __init__(self, base: FrozenBase | list[FrozenBase], limits: LimitsConfig):
        # Mixed-base adapters need every base of their run; all bases share base 0's tokenizer.
        self.bases = base if isinstance(base, list) else [base]
        base = self.base = self.bases[0]
        self.limits = limits
        self.tokenizer = base.tokenizer
        self.max_positions = int(getattr(base.model.config, "max_position_embeddings", 0) or 1 << 30)

    # -- prompts ---------------------------------------------------------------------------------
    def encode(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        if messages is not None:
            if not getattr(self.tokenizer, "chat_template", None):
                raise RequestError("this base has no chat template; use /v1/completions")
            prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(prompt)["input_ids"]
        if not ids:
            raise RequestError("the prompt is empty")
        if len(ids) > self.limits.max_prompt_tokens:
            raise RequestError(f"the prompt has {len(ids)} tokens; the limit is {self.limits.max_prompt_tokens}")
        return ids

    def check_length(self, row: Row) -> None:
        if len(row.prompt_ids) + row.max_tokens > self.max_positions:
            raise RequestError(f"prompt ({len(row.prompt_ids)} tokens) plus max_tokens ({row.max_tokens}) exceeds "
                               f"the base's context of {self.max_positions}")

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
    def run(self, rows: list[Row]) -> list[Row]:
        """Decode a batch; fills each row's text, token count and finish reason."""
        streams = [TextStream(self.tokenizer, r.stop) for r in rows]
        eos = self.tokenizer.eos_token_id

        def on_token(i: int, token: int) -> bool:
            row, ts = rows[i], streams[i]
            row.completion_tokens += 1
            if token == eos:
                row.finish_reason = "stop"
                delta = ts.flush()
            else:
                delta = ts.add(token)
                if ts.stopped:
                    row.finish_reason = "stop"
                elif row.completion_tokens >= row.max_tokens:
                    row.finish_reason = "length"
                    delta += ts.flush()
            if delta and row.on_text is not None:
                row.on_text(delta)
            return ts.stopped

        generate_mixed(self.bases, [r.prompt_ids for r in rows], [r.adapter for r in rows],
                       max_new_tokens=[r.max_tokens for r in rows], temperature=[r.temperature for r in rows],
                       top_p=[r.top_p for r in rows], seeds=[r.seed for r in rows], alphas=[r.alpha for r in rows],
                       on_token=on_token)
        for r, ts in zip(rows, streams):
            r.text = ts.out  # what a streaming client received, exactly
            r.finish_reason = r.finish_reason or "length"
        return rows
