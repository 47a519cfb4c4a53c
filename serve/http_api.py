"""The HTTP layer of the gateway: the FastAPI app, its error bodies and handlers, the bearer-key guard
that runs before a body is read, the OpenAPI document and offline docs, and the Prometheus text."""

import functools
import json
import logging
import re

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from carryon_ray import __version__

from . import protocol as P
from .access import user_for


log = logging.getLogger("carryon.serve")
RETRY_AFTER_S = 5  # what a client is told to wait after a replica was lost


# ---------------------------------------------------------------------------------------------
# HTTP ingress
# ---------------------------------------------------------------------------------------------

ERRORS = {status: {"model": P.ErrorResponse, "description": text} for status, text in {
    400: "Invalid request: the message names the field.",
    401: "Missing or invalid API key.",
    404: "No such model, or not available to this key.",
    413: "Request body over limits.max_body_bytes.",
    429: "Too many requests in flight for this key (see Retry-After).",
    503: "No model replica available, or the adapter cannot be loaded (see Retry-After).",
    504: "Generation took longer than limits.request_timeout_s.",
}.items()}


def json_error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                code: str | None = None, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return JSONResponse(P.error_body(message, type_, param, code), status_code=status, headers=headers)


def _from_error(exc: P.ServeError) -> JSONResponse:
    return json_error(exc.status, exc.message, exc.type, exc.param, exc.code, exc.retry_after)


def as_serve_error(exc: BaseException) -> P.ServeError | None:
    """The ServeError behind an exception that crossed a Serve handle (Ray wraps it), or a 503 for a
    replica that died or became unreachable mid-request; None for anything else."""
    if isinstance(exc, P.ServeError):
        cause = getattr(exc, "cause", None)  # Ray's wrapper keeps the original as .cause
        return cause if isinstance(cause, P.ServeError) else exc
    if isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
        return P.ServeError(503, "the model replica serving this request was lost; retry", "server_error",
                            code="replica_unavailable", retry_after=RETRY_AFTER_S)
    return None


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
    return json_error(400, "; ".join(dict.fromkeys(parts)) or "invalid request", param=param)


async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if exc.status_code == 400 and "parsing the body" in detail:
        detail = "the body is not valid UTF-8 JSON"
    return json_error(exc.status_code, detail)


async def _serve_error_handler(_request: Request, exc: P.ServeError) -> JSONResponse:
    return _from_error(as_serve_error(exc) or exc)


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    known = as_serve_error(exc)
    if known is not None:
        return _from_error(known)
    log.exception("unhandled error", exc_info=exc)
    return json_error(500, "internal error", "server_error")


PUBLIC = ("/healthz", "/health", "/docs", "/openapi.json")


class GatewayGuard:
    """ASGI middleware, the gateway's one authentication path: every route but the public ones
    (liveness, readiness, the docs) needs a valid key, checked before a byte of the body is read;
    the caller's user is put on the request (`request.state.user`) for the routes. A body is read
    as it streams in and refused with 413 over its path's limit (`limit_for(path)`), chunked bodies
    included."""

    def __init__(self, app, keys: dict[str, str], allow_anonymous: bool, limit_for):
        self.app, self.keys, self.allow_anonymous, self.limit_for = app, keys, allow_anonymous, limit_for

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path in PUBLIC or path.startswith("/docs/"):
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        auth = headers.get(b"authorization", b"").decode("latin-1") or None
        user = user_for(self.keys, auth, self.allow_anonymous)
        if user is None:
            return await _send(send, _unauthorized())
        scope.setdefault("state", {})["user"] = user
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.limit_for(path)
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return await _send(send, json_error(413, f"request body over {limit} bytes"))
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            total += len(message.get("body", b""))
            if total > limit:
                return await _send(send, json_error(413, f"request body over {limit} bytes"))
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
    return json_error(401, "missing or invalid API key (Authorization: Bearer <key>)", "authentication_error",
                       code="invalid_api_key")


def new_app(keys: dict[str, str], allow_anonymous: bool, limit_for) -> FastAPI:
    """A FastAPI app with the gateway's error bodies, its key guard and its OpenAPI document; the
    routes are added by serve/routes.py. One per gateway replica (no module-global state)."""
    app = FastAPI(
        title="carryon-ray",
        version=__version__,
        description="OpenAI-compatible completions, chat and fine-tuning over a frozen base LLM and per-user "
        "carry-on adapters. Authenticate with `Authorization: Bearer <key>`.",
        docs_url=None,  # served from the installed swagger-ui-bundle, so /docs works offline
        redoc_url=None,
    )
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(P.ServeError, _serve_error_handler)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(GatewayGuard, keys=keys, allow_anonymous=allow_anonymous, limit_for=limit_for)
    _install_openapi(app)
    return app


def _install_openapi(app: FastAPI) -> None:
    """The generated document with the statuses the server really answers: 400 (never 422) and the
    bearer scheme on every route the guard protects."""

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for ops in spec.get("paths", {}).values():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
        schemas = spec.get("components", {}).get("schemas", {})
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        spec.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "An API key from the server's keys file."}}
        for path, ops in spec.get("paths", {}).items():
            if path not in PUBLIC:
                for op in ops.values():
                    op["security"] = [{"bearer": []}]
        app.openapi_schema = spec
        return spec

    app.openapi = openapi


@functools.cache
def swagger_assets() -> dict[str, tuple[bytes, str]]:
    """The Swagger UI files shipped in the swagger-ui-bundle package (no CDN needed): name ->
    (bytes, media type), read once."""
    from pathlib import Path

    import swagger_ui_bundle

    types = {".js": "application/javascript", ".css": "text/css", ".png": "image/png"}
    root = Path(str(swagger_ui_bundle.swagger_ui_path))
    return {p.name: (p.read_bytes(), types[p.suffix]) for p in root.iterdir() if p.suffix in types}


def prometheus_text(info: dict) -> str:
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
