"""The Serve application: an OpenAI-compatible REST API over one base and many carry-on adapters.

Two deployments:

  Gateway      the HTTP ingress (FastAPI). Checks the bearer key before reading a body, streams
               the body in up to its limit, validates the request, bounds what one key may have in
               flight, decides which adapter the caller may use (see access.py), and forwards a
               typed GenerateRequest to a model replica with the adapter as Serve's multiplexed
               model id, so requests for an adapter go to replicas that already hold it.
  ModelServer  pinned to the inference-class resource. Holds the base once, an LRU of adapters
               (`serve.multiplexed`), and one decode engine (serve/engine.py) that admits and
               retires rows at every decoding step: rows of every adapter share each step's base
               forward, no request waits for a batch-mate, and a request whose client went away
               frees its row at the next step.

Failures cross from replica to gateway as `ServeError` exceptions carrying their HTTP status; a
replica that dies mid-request answers 503 with Retry-After. Run it with `carryon serve FILE`,
`serve run serve.app:build config=FILE`, or `serve deploy serve/config.yaml`.
"""

# No `from __future__ import annotations` here: FastAPI reads the route methods' annotations
# (Request, the body models) at runtime, after Serve has wrapped the class.
import asyncio
import functools
import json
import logging
import os
import re
import time
from typing import Any, AsyncIterator

import ray
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from carryon_ray import __version__
from carryon_ray.adapter import AdapterError

from . import protocol as P
from .access import Catalog, CatalogUnavailable, load_keys, user_for
from .engine import TTFT_BOUNDS, Generation, ServingEngine
from .settings import ServeConfig, load_serve_config

log = logging.getLogger("carryon.serve")
RETRY_AFTER_S = 5  # what a client is told to wait after a replica was lost


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
        bases = [FrozenBase.load(b) for b in [self.cfg.base, *self.cfg.extra_bases]]
        self.engine = ServingEngine(bases, self.cfg.limits, self.cfg.engine)
        self._sources: dict[str, str] = {}
        self.load_ms: list[float] = []
        self.metrics = _ReplicaMetrics()

        async def load(mux_id: str):
            t0 = time.perf_counter()
            adapter = await asyncio.to_thread(self.engine.load_adapter, self._sources[mux_id])
            self.load_ms.append(round((time.perf_counter() - t0) * 1000, 2))
            del self.load_ms[:-1000]
            return adapter

        # The LRU size comes from config, so the multiplexed loader is made per instance.
        self._adapter = serve.multiplexed(max_num_models_per_replica=self.cfg.replicas.max_adapters)(load)

    async def _start(self, req: P.GenerateRequest) -> list[Generation]:
        """Tokenize every prompt, load the adapter, queue one row per prompt and choice."""
        if req.messages is not None:
            prompts = [self.engine.encode(messages=req.messages, max_tokens=req.max_tokens)]
        else:
            prompts = [self.engine.encode(prompt=p, max_tokens=req.max_tokens) for p in req.prompts]
        total = sum(len(p) for p in prompts) * req.n
        if total > self.cfg.limits.max_request_prompt_tokens:
            raise P.ServeError(400, f"the request holds {total} prompt tokens (prompts x n); the limit is "
                               f"{self.cfg.limits.max_request_prompt_tokens}", param="prompt")
        adapter = None
        if req.mux_id:
            self._sources[req.mux_id] = req.source
            try:
                adapter = await self._adapter(req.mux_id)
            except AdapterError as exc:
                log.error("adapter %s (%s) failed to load: %s", req.model, req.source, exc)
                reason = re.sub(r"(/[^\s:;,()]+)+", "<path>", str(exc))  # no server paths in answers
                raise P.ServeError(503, f"adapter {req.model!r} cannot be loaded: {reason}", "adapter_unavailable",
                                   code="adapter_unavailable") from None
        gens = []
        for ids in prompts:
            for c in range(req.n):  # choices of one prompt: seed + c keeps them reproducible and distinct
                seed = None if req.seed is None else req.seed + c
                gens.append(self.engine.submit(req.model_copy(update={"seed": seed}), ids, adapter))
        self.metrics.admitted(req.model, len(gens))
        return gens

    async def generate(self, req: P.GenerateRequest) -> list[P.GenerateResult]:
        gens: list[Generation] = []
        try:
            gens = await self._start(req)
            results = await asyncio.gather(*(g.result() for g in gens))
            self.metrics.finished(results, self.engine)
            return results
        finally:  # cancelled (client gone, gateway timeout) or failed: free the rows at the next step
            for g in gens:
                g.cancel()

    async def generate_stream(self, req: P.GenerateRequest) -> AsyncIterator[Any]:
        gens = await self._start(req)  # one prompt, one choice (checked by the gateway)
        try:
            async for item in gens[0].stream():
                if isinstance(item, P.GenerateResult):
                    self.metrics.finished([item], self.engine)
                yield item
        finally:
            gens[0].cancel()

    async def ready(self) -> dict:
        return {"status": "ok", "base": self.cfg.model_id}

    def info(self) -> dict:
        return {**self.engine.stats(), "adapter_loads": len(self.load_ms),
                "load_ms_p50": sorted(self.load_ms)[len(self.load_ms) // 2] if self.load_ms else None,
                "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "base": self.cfg.model_id,
                "fingerprint": self.engine.base.fingerprint().to_dict()}


class _ReplicaMetrics:
    """Prometheus metrics through Ray's metrics pipeline (scraped from each node's metrics
    export port, like Serve's own): queue, running rows, tokens, time to first token, per-adapter
    requests."""

    def __init__(self):
        from ray.util import metrics

        self.requests = metrics.Counter("carryon_requests", "Rows admitted, by model id.", tag_keys=("model",))
        self.tokens = metrics.Counter("carryon_generated_tokens", "Completion tokens generated.")
        self.running = metrics.Gauge("carryon_running_rows", "Rows in the decode engine.")
        self.waiting = metrics.Gauge("carryon_waiting_rows", "Rows waiting for a place in the engine.")
        self.ttft = metrics.Histogram("carryon_time_to_first_token_s", "Seconds from submission to the first token.",
                                      boundaries=list(TTFT_BOUNDS))
        self._ttft_seen = 0

    def admitted(self, model: str, rows: int) -> None:
        self.requests.inc(rows, tags={"model": model})

    def finished(self, results, engine: ServingEngine) -> None:
        self.tokens.inc(sum(r.completion_tokens for r in results) or 0.0)
        stats = engine.stats()
        self.running.set(stats["running_rows"])
        self.waiting.set(stats["waiting"])
        for t in engine.ttft_since(self._ttft_seen):  # read the engine's record; never consume it
            self.ttft.observe(t)
        self._ttft_seen = stats["ttft_count"]


# ---------------------------------------------------------------------------------------------
# HTTP ingress
# ---------------------------------------------------------------------------------------------

api = FastAPI(
    title="carryon-ray",
    version=__version__,
    description="OpenAI-compatible completions over a frozen base LLM and per-user carry-on adapters. "
    "Authenticate with `Authorization: Bearer <key>`.",
    docs_url=None,  # served below from the installed swagger-ui-bundle, so /docs works offline
    redoc_url=None,
)
bearer = HTTPBearer(auto_error=False, description="An API key from the server's keys file.")
ERRORS = {status: {"model": P.ErrorResponse, "description": text} for status, text in {
    400: "Invalid request: the message names the field.",
    401: "Missing or invalid API key.",
    404: "No such model, or not available to this key.",
    413: "Request body over limits.max_body_bytes.",
    429: "Too many requests in flight for this key (see Retry-After).",
    503: "No model replica available, or the adapter cannot be loaded (see Retry-After).",
    504: "Generation took longer than limits.request_timeout_s.",
}.items()}


def _json_error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                code: str | None = None, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return JSONResponse(P.error_body(message, type_, param, code), status_code=status, headers=headers)


def _from_error(exc: P.ServeError) -> JSONResponse:
    return _json_error(exc.status, exc.message, exc.type, exc.param, exc.code, exc.retry_after)


def _serve_error(exc: BaseException) -> P.ServeError | None:
    """The ServeError behind an exception that crossed a Serve handle (Ray wraps it), or a 503 for a
    replica that died or became unreachable mid-request; None for anything else."""
    if isinstance(exc, P.ServeError):
        cause = getattr(exc, "cause", None)  # Ray's wrapper keeps the original as .cause
        return cause if isinstance(cause, P.ServeError) else exc
    if isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
        return P.ServeError(503, "the model replica serving this request was lost; retry", "server_error",
                            code="replica_unavailable", retry_after=RETRY_AFTER_S)
    return None


@api.exception_handler(RequestValidationError)
async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    parts, param = [], None
    for e in exc.errors():
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        # A union's branch names (str, list[str], ...) say nothing to the caller: keep the field path.
        loc = [p for p in loc if not re.match(r"^(str|int|list\[.*\]|function-after\[.*\]|literal\[.*\])$", p)]
        where = ".".join(loc) or "body"
        if e.get("type") != "json_invalid":
            param = param or where
        if e.get("type") == "extra_forbidden":
            parts.append(f"{where}: unknown field (not supported by this server)")
        elif e.get("type") == "json_invalid":
            parts.append(f"malformed JSON ({e.get('ctx', {}).get('error', 'parse error')})")
        elif e.get("type") == "missing":
            parts.append(f"{where}: required")
        else:
            parts.append(f"{where}: {e.get('msg')}")
    return _json_error(400, "; ".join(dict.fromkeys(parts)) or "invalid request", param=param)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if exc.status_code == 400 and "parsing the body" in detail:
        detail = "the body is not valid UTF-8 JSON"
    return _json_error(exc.status_code, detail)


@api.exception_handler(P.ServeError)
async def _serve_error_handler(_request: Request, exc: P.ServeError) -> JSONResponse:
    return _from_error(_serve_error(exc) or exc)


@api.exception_handler(Exception)
async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    known = _serve_error(exc)
    if known is not None:
        return _from_error(known)
    log.exception("unhandled error", exc_info=exc)
    return _json_error(500, "internal error", "server_error")


class GatewayGuard:
    """ASGI middleware: the key is checked before a request body is read (a request without a
    valid key is answered 401 without reading a byte of it), and the body is read as it streams in
    and refused with 413 at `limits.max_body_bytes`, chunked bodies included."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        state = scope["app"].state
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        auth = headers.get(b"authorization", b"").decode("latin-1") or None
        if user_for(state.keys, auth, state.allow_anonymous) is None:
            return await _send(send, _unauthorized())
        limit = state.max_body_bytes
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return await _send(send, _json_error(413, f"request body over {limit} bytes"))
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            total += len(message.get("body", b""))
            if total > limit:
                return await _send(send, _json_error(413, f"request body over {limit} bytes"))
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect notices for streaming responses

        await self.app(scope, replay, send)


async def _send(send, response: JSONResponse) -> None:
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def _unauthorized() -> JSONResponse:
    return _json_error(401, "missing or invalid API key (Authorization: Bearer <key>)", "authentication_error",
                       code="invalid_api_key")


api.add_middleware(GatewayGuard)


def _openapi() -> dict:
    """The generated document with the statuses the server really answers: 400 (never 422) and
    the bearer scheme on every /v1 route."""
    if api.openapi_schema:
        return api.openapi_schema
    spec = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
    for path, ops in spec.get("paths", {}).items():
        for op in ops.values():
            op.get("responses", {}).pop("422", None)
    schemas = spec.get("components", {}).get("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    api.openapi_schema = spec
    return spec


api.openapi = _openapi


@functools.cache
def _swagger_assets() -> dict[str, tuple[bytes, str]]:
    """The Swagger UI files shipped in the swagger-ui-bundle package (no CDN needed): name ->
    (bytes, media type), read once."""
    from pathlib import Path

    import swagger_ui_bundle

    types = {".js": "application/javascript", ".css": "text/css", ".png": "image/png"}
    root = Path(str(swagger_ui_bundle.swagger_ui_path))
    return {p.name: (p.read_bytes(), types[p.suffix]) for p in root.iterdir() if p.suffix in types}


def _prometheus(info: dict) -> str:
    """A replica's engine counters in the Prometheus text format."""
    lines, seen = [], set()

    def metric(name, kind, help_, value, labels=""):
        if value is None:
            return
        if name not in seen:
            seen.add(name)
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
        lines.append(f"{name}{labels} {value}")

    metric("carryon_running_rows", "gauge", "Rows in the decode engine.", info["running_rows"])
    metric("carryon_waiting_rows", "gauge", "Rows waiting for a place in the engine.", info["waiting"])
    metric("carryon_engine_steps_total", "counter", "Decoding steps run.", info["steps"])
    metric("carryon_generated_tokens_total", "counter", "Completion tokens generated.", info["generated_tokens"])
    metric("carryon_prompt_tokens_total", "counter", "Prompt tokens prefilled.", info["prompt_tokens"])
    metric("carryon_kv_cache_bytes", "gauge", "Bytes held by the KV cache pools.", info["kv_bytes"])
    metric("carryon_time_to_first_token_p50_seconds", "gauge", "Median time to first token, recent requests.",
           info["ttft_p50_s"])
    name = "carryon_time_to_first_token_seconds"
    lines += [f"# HELP {name} Seconds from submission to the first token.", f"# TYPE {name} histogram"]
    lines += [f'{name}_bucket{{le="{le}"}} {n}' for le, n in info["ttft_buckets"].items()]
    lines += [f"{name}_sum {info['ttft_sum_s']}", f"{name}_count {info['ttft_count']}"]
    for reason, n in sorted(info["finished"].items()):
        metric("carryon_finished_total", "counter", "Rows ended, by reason.", n, f'{{reason="{reason}"}}')
    for model, n in sorted(info["adapter_rows"].items()):
        metric("carryon_requests_total", "counter", "Rows admitted, by model id.", n, f'{{model="{model}"}}')
    return "\n".join(lines) + "\n"


# Serve's ingress captures the app (and the globals its routes use) when the class below is
# defined: every helper the routes call must be defined above this line.
@serve.deployment(name="Gateway")
@serve.ingress(api)
class Gateway:
    def __init__(self, model, settings: dict, key_digests: dict[str, str]):
        self.model = model
        self.cfg = ServeConfig.model_validate(settings)
        self.keys = key_digests
        self.catalog = Catalog(self.cfg)
        self.inflight: dict[str, int] = {}
        api.state.keys, api.state.allow_anonymous = key_digests, self.cfg.auth.allow_anonymous  # for GatewayGuard
        api.state.max_body_bytes = self.cfg.limits.max_body_bytes

    # -- helpers ---------------------------------------------------------------------------------
    def _user(self, request: Request) -> str:
        user = user_for(self.keys, request.headers.get("authorization"), self.cfg.auth.allow_anonymous)
        if user is None:
            raise P.ServeError(401, "missing or invalid API key (Authorization: Bearer <key>)", "authentication_error",
                               code="invalid_api_key")
        return user

    async def _resolve(self, user: str, model: str) -> tuple[str, str | None]:
        """(mux id, source) of the model the caller names; 404 for missing and not-yours alike."""
        if model == self.cfg.model_id:
            return "", None
        try:
            found = await asyncio.to_thread(self.catalog.resolve, user, model)
        except CatalogUnavailable as exc:
            raise P.ServeError(503, str(exc), "server_error", retry_after=RETRY_AFTER_S) from None
        if found is None:
            raise P.ServeError(404, f"model {model!r} does not exist or is not available to this key", param="model",
                               code="model_not_found")
        return found.mux_id, found.source

    async def _admit(self, user: str, body: P.SamplingFields, logprobs: int | None) -> P.GenerateRequest:
        """Every check common to both routes; the typed request for the replica."""
        lim = self.cfg.limits
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or min(lim.default_max_tokens,
                                                                                               lim.max_tokens)
        if max_tokens > lim.max_tokens:
            raise P.ServeError(400, f"max_tokens {max_tokens} is over this server's limit of {lim.max_tokens}",
                               param="max_tokens")
        if body.carryon_alpha is not None and body.carryon_alpha > lim.alpha_max:
            raise P.ServeError(400, f"carryon_alpha must be within [0, {lim.alpha_max}]", param="carryon_alpha")
        if len(body.stop) > lim.max_stop:
            raise P.ServeError(400, f"at most {lim.max_stop} stop strings", param="stop")
        if body.n > lim.max_n:
            raise P.ServeError(400, f"n: at most {lim.max_n} choices per prompt", param="n")
        if body.stream and (body.n > 1 or logprobs is not None):
            raise P.ServeError(400, "streaming takes n = 1 and no logprobs", param="stream")
        mux_id, source = await self._resolve(user, body.model)
        if not mux_id and body.carryon_alpha:
            raise P.ServeError(400, "carryon_alpha needs an adapter; the bare base has none", param="carryon_alpha")
        return P.GenerateRequest(model=body.model, max_tokens=max_tokens, temperature=body.temperature,
                                 top_p=body.top_p, seed=body.seed, alpha=body.carryon_alpha, stop=body.stop,
                                 logprobs=logprobs, n=body.n, ignore_eos=body.ignore_eos, mux_id=mux_id,
                                 presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                                 repetition_penalty=body.repetition_penalty, source=source, user=user)

    def _slot(self, user: str) -> None:
        """Count a request against its key's concurrency limit (429 past it)."""
        if self.inflight.get(user, 0) >= self.cfg.limits.max_concurrent_per_key:
            raise P.ServeError(429, f"this key already has {self.cfg.limits.max_concurrent_per_key} requests in "
                               "flight; retry after one finishes", "rate_limit_error", code="rate_limit_exceeded",
                               retry_after=1)
        self.inflight[user] = self.inflight.get(user, 0) + 1

    def _unslot(self, user: str) -> None:
        self.inflight[user] -= 1
        if not self.inflight[user]:
            del self.inflight[user]

    def _handle(self, req: P.GenerateRequest, stream: bool):
        return self.model.options(multiplexed_model_id=req.mux_id, stream=stream)

    async def _run(self, user: str, req: P.GenerateRequest) -> list[P.GenerateResult]:
        self._slot(user)
        try:
            return await self._handle(req, False).generate.remote(req)
        finally:
            self._unslot(user)

    async def _stream(self, user: str, req: P.GenerateRequest, render, include_usage: bool) -> StreamingResponse:
        """Server-sent events; errors before the first token are real HTTP errors, after it they are
        reported in-band. The replica's row is cancelled when the client goes away."""
        self._slot(user)
        try:
            gen = self._handle(req, True).generate_stream.remote(req)
            first = await gen.__anext__()
        except BaseException:
            self._unslot(user)
            raise

        async def events():
            item = first
            try:
                while True:
                    for payload in render(item, include_usage):
                        yield f"data: {json.dumps(payload)}\n\n"
                    if isinstance(item, P.GenerateResult):
                        break
                    item = await gen.__anext__()
            except StopAsyncIteration:
                pass
            except Exception as exc:  # noqa: BLE001 - after the stream began: report in-band, then end
                err = _serve_error(exc) or P.ServeError(500, "internal error during generation", "server_error")
                yield f"data: {json.dumps(err.body())}\n\n"
            finally:
                gen.cancel()  # a no-op when the stream ended; frees the row when the client left
                self._unslot(user)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    # -- routes ----------------------------------------------------------------------------------
    @api.get("/healthz", summary="Liveness: the gateway answers")
    async def healthz(self) -> dict:
        return {"status": "ok", "base": self.cfg.model_id}

    @api.get("/health", summary="Readiness: a model replica answers", responses={503: ERRORS[503]})
    async def health(self):
        try:
            info = await asyncio.wait_for(self.model.ready.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - no replica (starting, dead, unreachable)
            return _json_error(503, "no model replica is ready", "server_error", code="not_ready",
                               retry_after=RETRY_AFTER_S)
        return info

    @api.get("/docs", include_in_schema=False)
    async def docs(self) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{api.title} API",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css",
                                   swagger_favicon_url="/docs/assets/favicon-32x32.png")

    @api.get("/docs/assets/{name}", include_in_schema=False)
    async def docs_asset(self, name: str):
        asset = _swagger_assets().get(name)
        if asset is None:
            return _json_error(404, "no such asset")
        return Response(asset[0], media_type=asset[1], headers={"Cache-Control": "max-age=86400"})

    @api.get("/v1/models", summary="Models this key may use: the base and the caller's adapters",
             responses={k: ERRORS[k] for k in (401, 503)}, dependencies=[Depends(bearer)])
    async def models(self, request: Request):
        user = self._user(request)
        try:
            names = await asyncio.to_thread(self.catalog.visible, user)
        except CatalogUnavailable as exc:
            raise P.ServeError(503, str(exc), "server_error", retry_after=RETRY_AFTER_S) from None
        data = [P.model_card(self.cfg.model_id)] + [P.model_card(n, self.cfg.model_id) for n in names]
        return {"object": "list", "data": data}

    @api.get("/v1/models/{model_id}", summary="One model, if this key may use it",
             responses={k: ERRORS[k] for k in (401, 404, 503)}, dependencies=[Depends(bearer)])
    async def model(self, request: Request, model_id: str):
        user = self._user(request)
        await self._resolve(user, model_id)
        return P.model_card(model_id, None if model_id == self.cfg.model_id else self.cfg.model_id)

    @api.get("/v1/carryon/stats", summary="Engine counters of the model replica that answers (admins only)",
             dependencies=[Depends(bearer)])
    async def stats(self, request: Request):
        if self._user(request) not in self.cfg.auth.admins:
            return _json_error(403, "statistics are for admin users", "permission_error")
        return await self.model.info.remote()

    @api.get("/metrics", summary="Prometheus text: the answering replica's engine (admins only)",
             response_class=PlainTextResponse, dependencies=[Depends(bearer)])
    async def metrics(self, request: Request):
        if self._user(request) not in self.cfg.auth.admins:
            return _json_error(403, "metrics are for admin users", "permission_error")
        return PlainTextResponse(_prometheus(await self.model.info.remote()))

    @api.post("/v1/completions", summary="Text completion (OpenAI-compatible)", responses=ERRORS,
              dependencies=[Depends(bearer)])
    async def completions(self, request: Request, body: P.CompletionRequest):
        user = self._user(request)
        prompts = body.prompts()
        lim = self.cfg.limits
        if not prompts or len(prompts) > lim.max_prompts:
            raise P.ServeError(400, f"give 1 to {lim.max_prompts} prompts", param="prompt")
        for p in prompts:
            if not p:
                raise P.ServeError(400, "the prompt is empty", param="prompt")
            if isinstance(p, str) and len(p) > lim.max_prompt_chars:
                raise P.ServeError(400, f"the prompt is over {lim.max_prompt_chars} characters", param="prompt")
        req = (await self._admit(user, body, body.logprobs)).model_copy(update={"prompts": prompts})
        rid, created = P.new_id("cmpl"), int(time.time())
        if body.stream:
            if len(prompts) != 1:
                raise P.ServeError(400, "streaming takes one prompt", param="prompt")

            def render(item, include_usage):
                if isinstance(item, P.StreamDelta):
                    return [P.completion_chunk(rid, body.model, created, item.text, None)]
                out = [P.completion_chunk(rid, body.model, created, "", item.finish_reason)]
                return out + ([P.usage_chunk(rid, body.model, created, "text_completion", item)] if include_usage else [])

            return await self._stream(user, req, render, bool(body.stream_options and body.stream_options.include_usage))
        return P.completion_body(rid, body.model, await self._run(user, req))

    @api.post("/v1/chat/completions", summary="Chat completion (OpenAI-compatible)", responses=ERRORS,
              dependencies=[Depends(bearer)])
    async def chat(self, request: Request, body: P.ChatCompletionRequest):
        user = self._user(request)
        messages = [{"role": m.template_role(), "content": m.text()} for m in body.messages]
        if sum(len(m["content"]) for m in messages) > self.cfg.limits.max_prompt_chars:
            raise P.ServeError(400, f"the messages are over {self.cfg.limits.max_prompt_chars} characters",
                               param="messages")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise P.ServeError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        req = (await self._admit(user, body, logprobs)).model_copy(update={"messages": messages})
        rid, created = P.new_id("chatcmpl"), int(time.time())
        if body.stream:
            started = []

            def render(item, include_usage):
                out = []
                if not started:
                    started.append(True)
                    out.append(P.chat_chunk(rid, body.model, created, {"role": "assistant", "content": ""}, None))
                if isinstance(item, P.StreamDelta):
                    return out + [P.chat_chunk(rid, body.model, created, {"content": item.text}, None)]
                out.append(P.chat_chunk(rid, body.model, created, {}, item.finish_reason))
                return out + ([P.usage_chunk(rid, body.model, created, "chat.completion.chunk", item)]
                              if include_usage else [])

            return await self._stream(user, req, render, bool(body.stream_options and body.stream_options.include_usage))
        return P.chat_body(rid, body.model, await self._run(user, req))


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
