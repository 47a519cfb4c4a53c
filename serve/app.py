"""The Serve application: an OpenAI-compatible REST API over one base and many carry-on adapters.

Two deployments:

  Gateway      the HTTP ingress (FastAPI). Authenticates the bearer key, validates the request,
               decides which adapter the caller may use (see access.py), and forwards the request
               to a model replica with the adapter as Serve's multiplexed model id, so requests
               for an adapter go to replicas that already hold it.
  ModelServer  pinned to the inference-class resource. Holds the base once and an LRU of
               adapters (`serve.multiplexed`). Concurrent requests are collected by `serve.batch`
               and decoded together: one base forward per step for every row, then each group of
               rows through its own carry-on (`generate_mixed`).

Run it with `carryon serve FILE`, `serve run serve.app:build config=FILE`, or `serve deploy
serve/config.yaml`.
"""

# No `from __future__ import annotations` here: FastAPI reads the route methods' annotations
# (Request, the body models) at runtime, after Serve has wrapped the class.
import asyncio
import contextvars
import dataclasses
import json
import logging
import re
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve import context as serve_context
from starlette.exceptions import HTTPException as StarletteHTTPException

from carryon_ray import __version__
from carryon_ray.adapter import AdapterError

from . import protocol as P
from .access import Catalog, CatalogUnavailable, load_keys, user_for
from .engine import Engine, RequestError, Row
from .settings import ServeConfig, load_serve_config

log = logging.getLogger("carryon.serve")


def _err(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
         code: str | None = None) -> dict:
    """An error as data: replicas return these instead of raising, so nothing crosses a handle as
    an exception and one bad request never fails its batch-mates."""
    return {"error": P.error_body(message, type_, param, code)["error"], "status": status}


async def _prepend(first: Any, rest: AsyncIterator) -> AsyncIterator:
    yield first
    async for item in rest:
        yield item


# ---------------------------------------------------------------------------------------------
# Model replicas
# ---------------------------------------------------------------------------------------------


@serve.deployment(name="ModelServer")
class ModelServer:
    def __init__(self, settings: dict):
        from carryon_ray.base import FrozenBase

        self.cfg = ServeConfig.model_validate(settings)
        if self.cfg.registry.tracking_uri:  # models:/ sources download from this registry
            import mlflow

            mlflow.set_tracking_uri(self.cfg.registry.tracking_uri)
            mlflow.set_registry_uri(self.cfg.registry.tracking_uri)
        self.engine = Engine([FrozenBase.load(b) for b in [self.cfg.base, *self.cfg.extra_bases]], self.cfg.limits)
        self._sources: dict[str, str] = {}
        self.stats = {"batches": 0, "rows": 0, "max_batch": 0, "batch_sizes": {}, "adapter_loads": 0, "load_ms": []}

        async def load(mux_id: str):
            t0 = time.perf_counter()
            adapter = await asyncio.to_thread(self.engine.load_adapter, self._sources[mux_id])
            self.stats["adapter_loads"] += 1
            self.stats["load_ms"].append(round((time.perf_counter() - t0) * 1000, 2))
            return adapter

        # The LRU size comes from config, so the multiplexed loader is made per instance.
        self._adapter = serve.multiplexed(max_num_models_per_replica=self.cfg.replicas.max_adapters)(load)
        self._batch.set_max_batch_size(self.cfg.batching.max_batch_size)
        self._batch.set_batch_wait_timeout_s(self.cfg.batching.batch_wait_timeout_s)

    def _enqueue(self, row: Row) -> asyncio.Task:
        """Queue a row for the next batch, whatever adapter it names.

        `serve.batch` splits a batch by multiplexed model id (one model per batch is what
        multi-model serving usually needs). Carry-ons share the base forward across adapters, so
        the row is queued from a copy of the request context with the id blanked; routing to a
        replica that holds the adapter already happened.
        """
        ctx = contextvars.copy_context()

        def blank():
            current = serve_context._get_serve_request_context()
            serve_context._serve_request_context.set(dataclasses.replace(current, multiplexed_model_id=""))

        ctx.run(blank)
        return asyncio.get_running_loop().create_task(self._batch(row), context=ctx)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def _batch(self, rows: list[Row]) -> list[Row]:
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(rows))
        sizes = self.stats["batch_sizes"]
        sizes[len(rows)] = sizes.get(len(rows), 0) + 1
        return await asyncio.to_thread(self.engine.run, rows)

    async def _prepare(self, req: dict) -> Row | dict:
        try:
            ids = self.engine.encode(prompt=req.get("prompt"), messages=req.get("messages"))
            row = Row(ids, None, req["max_tokens"], req["temperature"], req["top_p"], req["seed"],
                      req["alpha"], req["stop"])
            self.engine.check_length(row)
        except RequestError as exc:
            return _err(400, str(exc), param="prompt")
        if req["mux_id"]:
            self._sources[req["mux_id"]] = req["source"]
            try:
                row.adapter = await self._adapter(req["mux_id"])
            except AdapterError as exc:
                log.error("adapter %s (%s) failed to load: %s", req["model"], req["source"], exc)
                reason = re.sub(r"(/[^\s:;,()]+)+", "<path>", str(exc))  # no server paths in answers
                return _err(503, f"adapter {req['model']!r} cannot be loaded: {reason}", "adapter_unavailable",
                            code="adapter_unavailable")
        return row

    @staticmethod
    def _result(row: Row) -> dict:
        return {"text": row.text, "finish_reason": row.finish_reason, "prompt_tokens": len(row.prompt_ids),
                "completion_tokens": row.completion_tokens}

    async def generate(self, req: dict) -> dict:
        row = await self._prepare(req)
        if isinstance(row, dict):
            return row
        try:
            return self._result(await self._enqueue(row))
        except Exception:  # noqa: BLE001 - a bug must not take the replica down; the log has it
            log.exception("generation failed")
            return _err(500, "internal error during generation", "server_error")

    async def generate_stream(self, req: dict) -> AsyncIterator[dict]:
        row = await self._prepare(req)
        if isinstance(row, dict):
            yield row
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        row.on_text = lambda delta: loop.call_soon_threadsafe(queue.put_nowait, delta)
        task = self._enqueue(row)
        # Deltas are queued from the decoding thread before the batch's result is delivered, so the
        # end marker always comes after the last delta.
        task.add_done_callback(lambda _t: queue.put_nowait(None))
        while (delta := await queue.get()) is not None:
            yield {"delta": delta}
        try:
            yield {"done": self._result(await task)}
        except Exception:  # noqa: BLE001
            log.exception("generation failed")
            yield _err(500, "internal error during generation", "server_error")

    def info(self) -> dict:
        import ray

        return {**self.stats, "node_id": ray.get_runtime_context().get_node_id(), "max_batch_size": self._batch._get_max_batch_size(),
                "batch_wait_timeout_s": self._batch._get_batch_wait_timeout_s(), "base": self.cfg.model_id, "fingerprint": self.engine.base.fingerprint().to_dict()}


# ---------------------------------------------------------------------------------------------
# HTTP ingress
# ---------------------------------------------------------------------------------------------

api = FastAPI(
    title="carryon-ray",
    version=__version__,
    description="OpenAI-compatible completions over a frozen base LLM and per-user carry-on adapters.",
)


def _json_error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                code: str | None = None) -> JSONResponse:
    return JSONResponse(P.error_body(message, type_, param, code), status_code=status)


@api.exception_handler(RequestValidationError)
async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    parts, param = [], None
    for e in exc.errors():
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        if e.get("type") != "json_invalid":
            param = param or where
        if e.get("type") == "extra_forbidden":
            parts.append(f"{where}: unknown field")
        elif e.get("type") == "json_invalid":
            parts.append(f"malformed JSON ({e.get('ctx', {}).get('error', 'parse error')})")
        elif e.get("type") == "missing":
            parts.append(f"{where}: required")
        else:
            parts.append(f"{where}: {e.get('msg')}")
    return _json_error(400, "; ".join(parts) or "invalid request", param=param)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if exc.status_code == 400 and "parsing the body" in detail:
        detail = "the body is not valid UTF-8 JSON"
    return _json_error(exc.status_code, detail)


@api.middleware("http")
async def _body_limit(request: Request, call_next):
    """Refuse an oversized body before anything parses it."""
    limit = getattr(request.app.state, "max_body_bytes", None)
    cl = request.headers.get("content-length")
    if limit and cl and cl.isdigit() and int(cl) > limit:
        return _json_error(413, f"request body over {limit} bytes")
    return await call_next(request)


@api.exception_handler(Exception)
async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return _json_error(500, "internal error", "server_error")


@serve.deployment(name="Gateway")
@serve.ingress(api)
class Gateway:
    def __init__(self, model, settings: dict, key_digests: dict[str, str]):
        self.model = model
        self.cfg = ServeConfig.model_validate(settings)
        self.keys = key_digests
        self.catalog = Catalog(self.cfg)
        api.state.max_body_bytes = self.cfg.limits.max_body_bytes  # read by the _body_limit middleware

    # -- helpers ---------------------------------------------------------------------------------
    def _user(self, request: Request) -> str | None:
        return user_for(self.keys, request.headers.get("authorization"), self.cfg.auth.allow_anonymous)

    async def _admit(self, request: Request, body: P.SamplingFields) -> tuple[dict, JSONResponse | None]:
        """Common checks; returns the request fields for the replica, or an error response."""
        user = self._user(request)
        if user is None:
            return {}, _json_error(401, "missing or invalid API key (Authorization: Bearer <key>)",
                                   "authentication_error", code="invalid_api_key")
        lim = self.cfg.limits
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or min(lim.default_max_tokens, lim.max_tokens)
        if max_tokens > lim.max_tokens:
            return {}, _json_error(400, f"max_tokens {max_tokens} is over this server's limit of {lim.max_tokens}",
                                   param="max_tokens")
        if body.carryon_alpha is not None and body.carryon_alpha > lim.alpha_max:
            return {}, _json_error(400, f"carryon_alpha must be within [0, {lim.alpha_max}]", param="carryon_alpha")
        if len(body.stop) > lim.max_stop:
            return {}, _json_error(400, f"at most {lim.max_stop} stop strings", param="stop")
        req = {"model": body.model, "max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
               "seed": body.seed, "alpha": body.carryon_alpha, "stop": body.stop, "mux_id": "", "source": None}
        if body.model != self.cfg.model_id:
            try:
                found = await asyncio.to_thread(self.catalog.resolve, user, body.model)
            except CatalogUnavailable as exc:
                return {}, _json_error(503, str(exc), "server_error")
            if found is None:  # missing and not-yours read the same
                return {}, _json_error(404, f"model {body.model!r} does not exist or is not available to this key",
                                       param="model", code="model_not_found")
            req.update(mux_id=found.mux_id, source=found.source)
        elif body.carryon_alpha:
            return {}, _json_error(400, "carryon_alpha needs an adapter; the bare base has none", param="carryon_alpha")
        return req, None

    def _handle(self, req: dict, stream: bool):
        return self.model.options(multiplexed_model_id=req["mux_id"], stream=stream)

    @staticmethod
    def _failure(result: dict) -> JSONResponse:
        return JSONResponse({"error": result["error"]}, status_code=result["status"])

    def _sse(self, req: dict, first: dict, chunks: AsyncIterator[dict], render, include_usage: bool) -> StreamingResponse:
        async def events():
            item = first
            async for nxt in _prepend(item, chunks):
                if "error" in nxt:  # a failure after the stream began: report it in-band, then end
                    yield f"data: {json.dumps({'error': nxt['error']})}\n\n"
                    break
                for payload in render(nxt, include_usage):
                    yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _stream_or_error(self, req: dict):
        gen = self._handle(req, True).generate_stream.remote(req)
        first = await gen.__anext__()
        return first, gen

    # -- routes ----------------------------------------------------------------------------------
    @api.get("/healthz", summary="Liveness: the gateway answers")
    async def healthz(self) -> dict:
        return {"status": "ok", "base": self.cfg.model_id}

    @api.get("/v1/models", summary="Models this key may use: the base and the caller's adapters")
    async def models(self, request: Request):
        user = self._user(request)
        if user is None:
            return _json_error(401, "missing or invalid API key", "authentication_error", code="invalid_api_key")
        names = await asyncio.to_thread(self.catalog.visible, user)
        data = [{"id": self.cfg.model_id, "object": "model", "created": 0, "owned_by": "carryon"}]
        data += [{"id": n, "object": "model", "created": 0, "owned_by": "carryon", "parent": self.cfg.model_id}
                 for n in names]
        return {"object": "list", "data": data}

    @api.get("/v1/carryon/stats", summary="Counters of the model replica that answers (admins only)")
    async def stats(self, request: Request):
        user = self._user(request)
        if user is None:
            return _json_error(401, "missing or invalid API key", "authentication_error", code="invalid_api_key")
        if user not in self.cfg.auth.admins:
            return _json_error(403, "statistics are for admin users", "permission_error")
        return await self.model.info.remote()

    @api.post("/v1/completions", summary="Text completion (OpenAI-compatible)")
    async def completions(self, request: Request, body: P.CompletionRequest):
        req, error = await self._admit(request, body)
        if error:
            return error
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or len(prompts) > self.cfg.limits.max_prompts:
            return _json_error(400, f"give 1 to {self.cfg.limits.max_prompts} prompts", param="prompt")
        for p in prompts:
            if not p:
                return _json_error(400, "the prompt is empty", param="prompt")
            if len(p) > self.cfg.limits.max_prompt_chars:
                return _json_error(400, f"the prompt is over {self.cfg.limits.max_prompt_chars} characters",
                                   param="prompt")
        rid, created = P.new_id("cmpl"), int(time.time())
        if body.stream:
            if len(prompts) != 1:
                return _json_error(400, "streaming takes one prompt", param="prompt")
            first, gen = await self._stream_or_error({**req, "prompt": prompts[0]})
            if "error" in first:
                return self._failure(first)

            def render(item, include_usage):
                if "delta" in item:
                    return [P.completion_chunk(rid, body.model, created, item["delta"], None)]
                r = item["done"]
                out = [P.completion_chunk(rid, body.model, created, "", r["finish_reason"])]
                return out + ([P.usage_chunk(rid, body.model, created, "text_completion", r)] if include_usage else [])

            return self._sse(req, first, gen, render, bool(body.stream_options and body.stream_options.include_usage))
        results = await asyncio.gather(*[self._handle(req, False).generate.remote({**req, "prompt": p}) for p in prompts])
        for r in results:
            if "error" in r:
                return self._failure(r)
        return P.completion_body(rid, body.model, results)

    @api.post("/v1/chat/completions", summary="Chat completion (OpenAI-compatible)")
    async def chat(self, request: Request, body: P.ChatCompletionRequest):
        req, error = await self._admit(request, body)
        if error:
            return error
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if sum(len(m["content"]) for m in messages) > self.cfg.limits.max_prompt_chars:
            return _json_error(400, f"the messages are over {self.cfg.limits.max_prompt_chars} characters",
                               param="messages")
        req["messages"] = messages
        rid, created = P.new_id("chatcmpl"), int(time.time())
        if body.stream:
            first, gen = await self._stream_or_error(req)
            if "error" in first:
                return self._failure(first)
            started = []

            def render(item, include_usage):
                out = []
                if not started:
                    started.append(True)
                    out.append(P.chat_chunk(rid, body.model, created, {"role": "assistant", "content": ""}, None))
                if "delta" in item:
                    return out + [P.chat_chunk(rid, body.model, created, {"content": item["delta"]}, None)]
                r = item["done"]
                out.append(P.chat_chunk(rid, body.model, created, {}, r["finish_reason"]))
                return out + ([P.usage_chunk(rid, body.model, created, "chat.completion.chunk", r)] if include_usage else [])

            return self._sse(req, first, gen, render, bool(body.stream_options and body.stream_options.include_usage))
        result = await self._handle(req, False).generate.remote(req)
        if "error" in result:
            return self._failure(result)
        return P.chat_body(rid, body.model, result)


# ---------------------------------------------------------------------------------------------
# Application builder
# ---------------------------------------------------------------------------------------------


def deployments(cfg: ServeConfig, key_digests: dict[str, str]):
    """The bound application for a validated config (resources and scaling from config)."""
    r = cfg.replicas
    actor = {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus}
    if r.resource_units > 0:
        actor["resources"] = {r.resource: r.resource_units}
    scaling: dict[str, Any] = {"num_replicas": r.min_replicas} if r.min_replicas == r.max_replicas else {
        "autoscaling_config": {"min_replicas": r.min_replicas, "max_replicas": r.max_replicas,
                               "target_ongoing_requests": r.target_ongoing_requests}}
    settings = cfg.model_dump()
    model = ModelServer.options(ray_actor_options=actor, max_ongoing_requests=r.max_ongoing_requests,
                                **scaling).bind(settings)
    gateway = Gateway.options(num_replicas=cfg.gateway.replicas, ray_actor_options={"num_cpus": cfg.gateway.num_cpus},
                              max_ongoing_requests=max(100, 4 * r.max_ongoing_requests))
    return gateway.bind(model, settings, key_digests)


def build(args: dict[str, Any]):
    """Serve entry point: `serve run serve.app:build config=FILE [field=value ...]`.

    `args` may name a YAML file under `config` and give any ServeConfig field (dotted keys
    allowed, e.g. `limits.max_tokens=128`); API keys are read here and only their digests are
    handed to the gateway.
    """
    args = dict(args or {})
    path = args.pop("config", None)
    dotted = {k: v for k, v in args.items() if "." in k}
    plain = {k: v for k, v in args.items() if "." not in k}
    cfg = load_serve_config(path, dotted, plain)
    return deployments(cfg, load_keys(cfg.auth))
