"""The gateway deployment: the HTTP ingress. Validates the request, bounds what one key may have in
flight, decides which adapter the caller may use (access.py), and forwards a typed GenerateRequest
to a model replica with the adapter as Serve's multiplexed model id; the fine-tuning routes call
the FinetuneService (finetune/service.py). The key was checked, and the user put on the request,
by the guard (http_api.py); serve/routes.py turns HTTP into calls on this class."""

import asyncio
import json
import logging
import time

from fastapi.responses import StreamingResponse
from ray import serve

from . import protocol as P
from .access import Catalog, CatalogUnavailable
from .http_api import RETRY_AFTER_S, as_serve_error, new_app, prometheus_text
from .settings import ServeConfig


log = logging.getLogger("carryon.serve")
UPLOAD_OVERHEAD = 1 << 20  # multipart framing and form fields around an uploaded file


@serve.deployment(name="Gateway")
@serve.ingress()
class Gateway:
    """What every route needs: the config, the catalog, per-key slots, the model handle, the
    fine-tuning service. serve/routes.py turns HTTP into calls on it; the app is built per replica
    (`__serve_build_asgi_app__`), after this constructor, from this object's own state."""

    def __init__(self, model, settings: dict, key_digests: dict[str, str]):
        self.model = model
        self.cfg = ServeConfig.model_validate(settings)
        self.keys = key_digests
        self.finetune = None
        if self.cfg.finetune.enabled and self.cfg.finetune_tracking_uri:
            from finetune.service import FinetuneService

            self.finetune = FinetuneService(self.cfg)
        self.catalog = Catalog(self.cfg, self.finetune)
        self.inflight: dict[str, int] = {}

    def __serve_build_asgi_app__(self):
        from .routes import build_routes

        return build_routes(self, new_app(self.keys, self.cfg.auth.allow_anonymous, self.body_limit))

    def body_limit(self, path: str) -> int:
        if path == "/v1/files":
            return self.cfg.finetune.max_file_bytes + UPLOAD_OVERHEAD
        return self.cfg.limits.max_body_bytes

    # -- helpers ---------------------------------------------------------------------------------
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
                err = as_serve_error(exc) or P.ServeError(500, "internal error during generation", "server_error")
                yield f"data: {json.dumps(err.body())}\n\n"
            finally:
                gen.cancel()  # a no-op when the stream ended; frees the row when the client left
                self._unslot(user)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    # -- what the routes answer (serve/routes.py) --------------------------------------------------
    async def health(self):
        return await asyncio.wait_for(self.model.ready.remote(), timeout=5)

    async def models(self, user: str) -> dict:
        try:
            names = await asyncio.to_thread(self.catalog.visible, user)
        except CatalogUnavailable as exc:
            raise P.ServeError(503, str(exc), "server_error", retry_after=RETRY_AFTER_S) from None
        data = [P.model_card(self.cfg.model_id)] + [P.model_card(n, self.cfg.model_id) for n in names]
        return {"object": "list", "data": data}

    async def model_card(self, user: str, model_id: str) -> dict:
        await self._resolve(user, model_id)
        return P.model_card(model_id, None if model_id == self.cfg.model_id else self.cfg.model_id)

    def admin(self, user: str, what: str) -> None:
        if user not in self.cfg.auth.admins:
            raise P.ServeError(403, f"{what} are for admin users", "permission_error")

    async def stats(self, user: str) -> dict:
        self.admin(user, "statistics")
        return await self.model.info.remote()

    async def metrics(self, user: str) -> str:
        self.admin(user, "metrics")
        return prometheus_text(await self.model.info.remote())

    async def completions(self, user: str, body: P.CompletionRequest):
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

    async def chat(self, user: str, body: P.ChatCompletionRequest):
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

    async def fine_tuning(self, method: str, *args, **kwargs):
        """A FinetuneService call in a thread (MLflow's client blocks); its ApiError as an HTTP error."""
        from finetune.jobs import ApiError

        if self.finetune is None:
            raise P.ServeError(404, "fine-tuning is not enabled on this server (finetune.enabled, and an MLflow "
                               "tracking URI)", code="not_enabled")
        try:
            return await asyncio.to_thread(getattr(self.finetune, method), *args, **kwargs)
        except ApiError as exc:
            raise P.ServeError(exc.status, exc.message, "rate_limit_error" if exc.status == 429 else
                               "invalid_request_error", exc.param, exc.code,
                               retry_after=30 if exc.status == 429 else None) from None
