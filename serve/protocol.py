"""The wire formats: the OpenAI-compatible request schemas (strict) and response bodies, and the
typed calls between the gateway and the model replicas.

Client requests reject unknown fields, so a typo such as `max_token` is a 400 naming the field
instead of a silently ignored parameter. Fields of the OpenAI API that real clients send with
neutral values (an empty logit_bias, a text response_format, the null fields the official client's
`model_dump()` adds to an assistant message) are accepted; any other value of them is a 400 that
names the field. Fields that only steer OpenAI's own platform (`store`, `metadata`,
`service_tier`) are accepted and ignored, as vLLM does. Presence, frequency and repetition
penalties are applied.

Between gateway and replica, a request is a `GenerateRequest`, a result a `GenerateResult` (a
stream yields `StreamDelta`s, then the result), and a failure a `ServeError` raised across the
call, carrying its HTTP status.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ServeError(Exception):
    """A request that fails with an HTTP status and an OpenAI-style error body. Raised in a replica,
    it reaches the gateway through the Serve handle (picklable: its fields are its args)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after: int | None = None):
        super().__init__(status, message, type_, param, code, retry_after)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.status} {self.message}"

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------
# Client requests (OpenAI-compatible).
# ---------------------------------------------------------------------------------------------


class StreamOptions(Strict):
    include_usage: bool = Field(False, description="Send a last chunk with token counts.")


class ResponseFormat(Strict):
    type: Literal["text"] = Field("text", description="Only plain text output is supported.")


class SamplingFields(Strict):
    model: str = Field(..., min_length=1, max_length=200, description="An adapter name, or the base's model id.")
    max_tokens: int | None = Field(None, ge=1, description="New tokens at most (bounded by the server's limit).")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy (below 1e-5 counts as greedy).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (the top token is always kept).")
    stop: str | list[str] | None = Field(
        None, validate_default=True, description="Generation ends before any of these strings."
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1,
                             description="Seed of the sampler (same seed, same output); without one every request "
                             "draws fresh randomness.")
    stream: bool = Field(False, description="Answer with server-sent events.")
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, description="Choices per prompt (bounded by the server's limit).")
    user: str | None = Field(None, max_length=256, description="Caller's end-user id (logged, not used).")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Subtracted once from the logit of every "
                                    "token already generated (OpenAI's definition; > 0 favours new tokens).")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Subtracted from a token's logit per time it "
                                     "was already generated (OpenAI's definition).")
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0, description="vLLM's extension: logits of tokens in the "
                                      "prompt or output divided by it (multiplied when negative); 1 = off.")
    store: bool | None = Field(None, description="OpenAI's stored-completions switch; accepted and ignored.")
    metadata: dict[str, str] | None = Field(None, description="OpenAI's stored-completion tags; accepted and ignored.")
    service_tier: str | None = Field(None, description="OpenAI's processing tier; accepted and ignored (one tier here).")
    logit_bias: dict[str, float] | None = Field(None, description="Accepted empty only.")
    carryon_alpha: float | None = Field(
        None, ge=0.0, description="Override of the adapter's alpha (0 = the base exactly), up to the server's limit."
    )
    ignore_eos: bool = Field(False, description="Keep generating after the end-of-sequence token, up to max_tokens "
                             "(vLLM's extension; for benchmarks).")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops

    @field_validator("presence_penalty", "frequency_penalty", "repetition_penalty", mode="before")
    @classmethod
    def _null_is_neutral(cls, v, info):  # the official client sends null for an unset penalty
        return cls.model_fields[info.field_name].default if v is None else v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported by this server (send {} or omit it)")
        return v


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="A prompt, a list of prompts, or token ids (one list per prompt); one choice each."
    )
    logprobs: int | None = Field(None, ge=0, le=20, description="Log-probabilities of each token and its top-k.")
    echo: Literal[False] = Field(False, description="Echoing the prompt is not supported.")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=64)
    # What the official client's model_dump() adds to an assistant message it echoes back.
    refusal: str | None = None
    annotations: list | None = None
    audio: None = None
    function_call: None = None
    tool_calls: list | None = None

    @model_validator(mode="after")
    def _plain_text(self) -> "Message":
        if self.tool_calls:
            raise ValueError("tool calls are not supported by this server")
        if self.content is None and self.role != "assistant":
            raise ValueError("content is required")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def template_role(self) -> str:
        return "system" if self.role == "developer" else self.role


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens.")
    logprobs: bool = Field(False, description="Log-probabilities of the output tokens.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="With logprobs: the k most likely tokens too.")
    response_format: ResponseFormat | None = None


# ---------------------------------------------------------------------------------------------
# Gateway <-> replica.
# ---------------------------------------------------------------------------------------------


class GenerateRequest(BaseModel):
    """One row of generation, as the gateway hands it to a model replica."""

    model: str
    prompts: list[str | list[int]] = []  # completions: texts or token ids, one row each (x n)
    messages: list[dict] | None = None  # chat: role/content pairs for the template (x n)
    n: int = 1  # choices per prompt
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None
    alpha: float | None = None
    stop: list[str] = []
    logprobs: int | None = None  # None: none; k: the chosen token's and the top k
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    mux_id: str = ""  # the adapter's multiplexing id ("" = the bare base)
    source: str | None = None  # where the replica loads the adapter from
    user: str = ""


class TokenLogprob(BaseModel):
    token: str
    id: int
    logprob: float
    top: list[tuple[str, float]] = []


class GenerateResult(BaseModel):
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None


class StreamDelta(BaseModel):
    text: str


# ---------------------------------------------------------------------------------------------
# Response bodies.
# ---------------------------------------------------------------------------------------------


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer has this body."""

    error: ErrorDetail


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_logprobs(r: GenerateResult) -> dict | None:
    if r.logprobs is None:
        return None
    offsets, at = [], 0
    for t in r.logprobs:
        offsets.append(at)
        at += len(t.token)
    return {"tokens": [t.token for t in r.logprobs], "token_logprobs": [t.logprob for t in r.logprobs],
            "top_logprobs": [dict(t.top) for t in r.logprobs], "text_offset": offsets}


def chat_logprobs(r: GenerateResult) -> dict | None:
    if r.logprobs is None:
        return None
    return {"content": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode()),
                         "top_logprobs": [{"token": s, "logprob": lp, "bytes": list(s.encode())} for s, lp in t.top]}
                        for t in r.logprobs], "refusal": None}


def completion_body(rid: str, model: str, results: list[GenerateResult]) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": r.text, "finish_reason": r.finish_reason,
                         "logprobs": completion_logprobs(r)} for i, r in enumerate(results)],
            "usage": usage(sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results))}


def chat_body(rid: str, model: str, results: list[GenerateResult]) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": r.text, "refusal": None},
                         "finish_reason": r.finish_reason, "logprobs": chat_logprobs(r)}
                        for i, r in enumerate(results)],
            "usage": usage(results[0].prompt_tokens, sum(r.completion_tokens for r in results))}


def completion_chunk(rid: str, model: str, created: int, text: str, finish: str | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish: str | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, r: GenerateResult) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(r.prompt_tokens, r.completion_tokens)}


def model_card(model_id: str, parent: str | None = None) -> dict:
    card = {"id": model_id, "object": "model", "created": 0, "owned_by": "carryon"}
    if parent:
        card["parent"] = parent
    return card
