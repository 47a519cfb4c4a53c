"""The gateway's HTTP routes: each turns a request into one call on the Gateway (serve/gateway.py)
and its answer into JSON. The caller's user is already on the request (the guard in http_api.py
is the one authentication path); nothing here checks a key.

    inference     GET /v1/models[/{id}], POST /v1/completions, POST /v1/chat/completions
    fine-tuning   /v1/files (upload, list, get, content, delete) and /v1/fine_tuning/jobs (create,
                  list, get, events, checkpoints, cancel): OpenAI's shapes (finetune/)
    operations    /healthz, /health, /docs, /v1/carryon/stats and /metrics (admins)
"""

# No `from __future__ import annotations`: FastAPI reads these annotations at runtime.
import json

from fastapi import FastAPI, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, PlainTextResponse, Response

from . import protocol as P
from .http_api import ERRORS, RETRY_AFTER_S, json_error, swagger_assets


def _errors(*codes):
    return {k: ERRORS[k] for k in codes if k in ERRORS}


def build_routes(gw, app: FastAPI) -> FastAPI:
    # -- operations --------------------------------------------------------------------------------
    @app.get("/healthz", summary="Liveness: the gateway answers")
    async def healthz() -> dict:
        return {"status": "ok", "base": gw.cfg.model_id}

    @app.get("/health", summary="Readiness: a model replica answers", responses=_errors(503))
    async def health():
        try:
            return await gw.health()
        except Exception:  # noqa: BLE001 - no replica (starting, dead, unreachable)
            return json_error(503, "no model replica is ready", "server_error", code="not_ready",
                              retry_after=RETRY_AFTER_S)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} API",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css",
                                   swagger_favicon_url="/docs/assets/favicon-32x32.png")

    @app.get("/docs/assets/{name}", include_in_schema=False)
    async def docs_asset(name: str):
        asset = swagger_assets().get(name)
        if asset is None:
            return json_error(404, "no such asset")
        return Response(asset[0], media_type=asset[1], headers={"Cache-Control": "max-age=86400"})

    @app.get("/v1/carryon/stats", summary="Engine counters of the model replica that answers (admins only)")
    async def stats(request: Request):
        return await gw.stats(request.state.user)

    @app.get("/metrics", summary="Prometheus text: the answering replica's engine (admins only)",
             response_class=PlainTextResponse)
    async def metrics(request: Request):
        return PlainTextResponse(await gw.metrics(request.state.user))

    # -- inference ---------------------------------------------------------------------------------
    @app.get("/v1/models", summary="Models this key may use: the base, its adapters and fine-tuned models",
             responses=_errors(401, 503))
    async def models(request: Request):
        return await gw.models(request.state.user)

    @app.get("/v1/models/{model_id:path}", summary="One model, if this key may use it", responses=_errors(401, 404, 503))
    async def model(request: Request, model_id: str):
        return await gw.model_card(request.state.user, model_id)

    @app.post("/v1/completions", summary="Text completion (OpenAI-compatible)", responses=ERRORS)
    async def completions(request: Request, body: P.CompletionRequest):
        return await gw.completions(request.state.user, body)

    @app.post("/v1/chat/completions", summary="Chat completion (OpenAI-compatible)", responses=ERRORS)
    async def chat(request: Request, body: P.ChatCompletionRequest):
        return await gw.chat(request.state.user, body)

    # -- files -------------------------------------------------------------------------------------
    @app.post("/v1/files", summary="Upload a training file (multipart: file, purpose=fine-tune)",
              responses=_errors(400, 401, 413))
    async def upload(request: Request):
        form = await request.form(max_files=1, max_fields=8, max_part_size=gw.cfg.finetune.max_file_bytes + 1)
        upload_file, purpose = form.get("file"), form.get("purpose")
        if upload_file is None or isinstance(upload_file, str):
            raise P.ServeError(400, "file: required (multipart/form-data with a file part)", param="file")
        if not isinstance(purpose, str):
            raise P.ServeError(400, "purpose: required (fine-tune)", param="purpose")
        content = await upload_file.read()
        return await gw.fine_tuning("upload", request.state.user, upload_file.filename or "", purpose, content)

    @app.get("/v1/files", summary="This key's files, newest first")
    async def list_files(request: Request, purpose: str | None = None, after: str | None = None,
                         limit: int = Query(10000, ge=1, le=10000), order: str = Query("desc", pattern="^(asc|desc)$")):
        return await gw.fine_tuning("list_files", request.state.user, purpose, after, limit, order)

    @app.get("/v1/files/{file_id}", summary="One file", responses=_errors(404))
    async def get_file(request: Request, file_id: str):
        return await gw.fine_tuning("get_file", request.state.user, file_id)

    @app.get("/v1/files/{file_id}/content", summary="A file's bytes", responses=_errors(404))
    async def file_content(request: Request, file_id: str):
        data = await gw.fine_tuning("file_content", request.state.user, file_id)
        return Response(data, media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}", summary="Delete a file", responses=_errors(404))
    async def delete_file(request: Request, file_id: str):
        return await gw.fine_tuning("delete_file", request.state.user, file_id)

    # -- fine-tuning jobs ------------------------------------------------------------------------------
    @app.post("/v1/fine_tuning/jobs", summary="Create a fine-tuning job (OpenAI's fields; ours under `carryon`)",
              responses=_errors(400, 401, 429))
    async def create_job(request: Request):
        try:
            body = json.loads(await request.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise P.ServeError(400, "the body is not valid UTF-8 JSON") from None
        if not isinstance(body, dict):
            raise P.ServeError(400, "the body must be a JSON object")
        return await gw.fine_tuning("create_job", request.state.user, body)

    @app.get("/v1/fine_tuning/jobs", summary="This key's fine-tuning jobs, newest first")
    async def list_jobs(request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=1000)):
        metadata = {k[len("metadata["):-1]: v for k, v in request.query_params.items()
                    if k.startswith("metadata[") and k.endswith("]")}
        return await gw.fine_tuning("list_jobs", request.state.user, after, limit, metadata or None)

    @app.get("/v1/fine_tuning/jobs/{job_id}", summary="One fine-tuning job", responses=_errors(404))
    async def get_job(request: Request, job_id: str):
        return await gw.fine_tuning("get_job", request.state.user, job_id)

    @app.get("/v1/fine_tuning/jobs/{job_id}/events", summary="A job's events, newest first: messages and metrics")
    async def job_events(request: Request, job_id: str, after: str | None = None,
                         limit: int = Query(20, ge=1, le=10000)):
        return await gw.fine_tuning("events", request.state.user, job_id, after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints", summary="A job's checkpoints (one per epoch), each servable")
    async def job_checkpoints(request: Request, job_id: str, after: str | None = None,
                              limit: int = Query(10, ge=1, le=1000)):
        return await gw.fine_tuning("checkpoints", request.state.user, job_id, after, limit)

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel", summary="Cancel a job (it stops at its next step)",
              responses=_errors(400, 404))
    async def cancel_job(request: Request, job_id: str):
        return await gw.fine_tuning("cancel", request.state.user, job_id)

    return app
