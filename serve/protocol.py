"""The OpenAI-compatible wire format: request schemas (strict) and response bodies.

Requests reject unknown fields, so a typo such as `max_token` is a 400 naming the field instead
of a silently ignored parameter. Fields of the OpenAI API this server does not implement
(logprobs, n > 1, penalties, tools) are unknown fields here, on purpose.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = Field(False, description="Send a last chunk with token counts.")


class SamplingFields(Strict):
    model: str = Field(..., min_length=1, max_length=200, description="An adapter name, or the base's model id.")
    max_tokens: int | None = Field(None, ge=1, description="New tokens at most (bounded by the server's limit).")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    stop: str | list[str] | None = Field(
        None, validate_default=True, description="Generation ends before any of these strings."
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Seed of the sampler (same seed, same output).")
    stream: bool = Field(False, description="Answer with server-sent events.")
    stream_options: StreamOptions | None = None
    n: Literal[1] = Field(1, description="Only one choice per prompt is supported.")
    user: str | None = Field(None, max_length=256, description="Caller's end-user id (logged, not used).")
    carryon_alpha: float | None = Field(
        None, ge=0.0, description="Override of the adapter's alpha (0 = the base exactly), up to the server's limit."
    )

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(..., description="A prompt, or a list of prompts (one choice each).")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(None, max_length=64)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens.")


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_body(rid: str, model: str, results: list[dict]) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": r["text"], "finish_reason": r["finish_reason"], "logprobs": None}
                        for i, r in enumerate(results)],
            "usage": usage(sum(r["prompt_tokens"] for r in results), sum(r["completion_tokens"] for r in results))}


def chat_body(rid: str, model: str, r: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": r["text"]},
                         "finish_reason": r["finish_reason"], "logprobs": None}],
            "usage": usage(r["prompt_tokens"], r["completion_tokens"])}


def completion_chunk(rid: str, model: str, created: int, text: str, finish: str | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish: str | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, r: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(r["prompt_tokens"], r["completion_tokens"])}
