"""The model replica: one base, an LRU of adapters, one decode engine (serve/async_engine.py), and its metrics."""

import asyncio
import logging
import os
import re
import time
from typing import Any, AsyncIterator

import ray
from ray import serve

from carryon_ray.adapter import AdapterError

from . import protocol as P
from .async_engine import AsyncEngine, Generation
from .settings import ServeConfig


log = logging.getLogger("carryon.serve")


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
        self.engine = AsyncEngine(bases, self.cfg.limits, self.cfg.engine)
        self._sources: dict[str, str] = {}
        self.load_ms: list[float] = []

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
        return gens

    async def generate(self, req: P.GenerateRequest) -> list[P.GenerateResult]:
        gens: list[Generation] = []
        try:
            gens = await self._start(req)
            return await asyncio.gather(*(g.result() for g in gens))
        finally:  # cancelled (client gone, gateway timeout) or failed: free the rows at the next step
            for g in gens:
                g.cancel()

    async def generate_stream(self, req: P.GenerateRequest) -> AsyncIterator[Any]:
        gens = await self._start(req)  # one prompt, one choice (checked by the gateway)
        try:
            async for item in gens[0].stream():
                yield item
        finally:
            gens[0].cancel()

    async def check_adapter(self, source: str, mux_id: str) -> int:
        """A fine-tuning job's servability check, on a replica that serves it: the adapter loads into
        this replica's LRU under its multiplexing id (so its first request needs no load) and decodes
        one token; returns the tokens decoded (1). Load failures raise as a request's would."""
        self._sources[mux_id] = source
        req = P.GenerateRequest(model=mux_id, prompts=["Hello"], max_tokens=1, temperature=0.0, top_p=1.0,
                                ignore_eos=True, mux_id=mux_id, source=source)
        return (await self.generate(req))[0].completion_tokens

    async def ready(self) -> dict:
        return {"status": "ok", "base": self.cfg.model_id}

    # -- co-serving: this replica is also an embedding producer (actors/service.py) --------------
    def base_configs(self) -> list[dict]:
        """The bases this replica runs, as a job's config names them (a job co-serves only here)."""
        return [b.model_dump(mode="json") for b in [self.cfg.base, *self.cfg.extra_bases]]

    def _producer(self):
        from carryon_ray.producer import Producer

        if getattr(self, "_embedder", None) is None:
            self._embedder = Producer(self.base_configs(), None, ray.get_runtime_context().get_node_id(),
                                      bases=self.engine.bases)
        return self._embedder

    async def embed(self, job: str, calibration: list, batch: dict, last: bool = True) -> dict:
        """A job's token rows -> embedding rows on this replica's base, no second copy: chunks of
        at most engine.embed_tokens padded tokens, each run between two decode steps."""
        from carryon_ray.producer import Request
        from carryon_ray.rows import ROW_INPUT_IDS, concat_rows

        producer = self._producer()
        if not producer.knows(job):
            calib = calibration[0]
            producer.register(job, calib if not isinstance(calib, ray.ObjectRef) else await calib)
        ids = batch[ROW_INPUT_IDS]
        width = max(max((len(x) for x in ids), default=1), 1)
        outs, at = [], 0
        while at < len(ids):  # each chunk sized when it is queued: about one decode step's share
            per = max(1, self.engine.beside_chunk_tokens() // width)
            chunk = {k: v[at : at + per] for k, v in batch.items()}
            n = len(chunk[ROW_INPUT_IDS])
            outs.append(await self.engine.run_beside(lambda c=chunk: producer.embed([Request(job, c, last)])[0],
                                                     tokens=n * width))
            at += n
        return concat_rows(outs)

    async def calibrate(self, bridge_cfg: dict, shallow: list[int], rows: list[dict],
                        tap_spec: tuple[int, int | None] = (0, None)):
        producer = self._producer()
        return await self.engine.run_beside(lambda: producer.calibrate(bridge_cfg, shallow, rows, tap_spec))

    async def score_heldout(self, cfg_json: dict, files: dict[str, bytes]) -> dict | None:
        """A co-serving job's held-out comparison on this replica's base, no second copy: the base's
        and base + adapter's greedy answers decode as rows of this engine beside the users' rows
        (sharing their steps), at most a quarter of the engine's rows at a time so users keep the
        rest. The adapter comes as its files (safetensors + JSON: data) and is loaded for this call
        only, not into the LRU. None when the job has no held-out set."""
        from carryon_ray.config import CarryOnConfig
        from carryon_ray.evaluation import adapter_files, heldout_prompts, heldout_result, job_heldout

        cfg = CarryOnConfig.model_validate(cfg_json)
        held = job_heldout(cfg)
        if held is None:
            return None

        def load():
            with adapter_files(files) as d:
                return self.engine.load_adapter(d)

        adapter = await asyncio.to_thread(load)
        tok = self.engine.tokenizer
        pairs, prompts = heldout_prompts(tok, *held)
        req = P.GenerateRequest(model="held-out", max_tokens=cfg.eval.max_new_tokens, temperature=0.0, top_p=1.0)
        rows = [(ids, None) for ids in prompts] + [(ids, adapter) for ids in prompts]
        wave = max(1, self.cfg.engine.max_rows // 4)
        out: list[list[int]] = []
        for at in range(0, len(rows), wave):
            gens = []
            try:
                for ids, a in rows[at : at + wave]:
                    while True:  # a queue full of users' requests: the job's rows wait their turn
                        try:
                            gens.append(self.engine.submit(req, ids, a))
                            break
                        except P.ServeError as exc:
                            if exc.code != "overloaded":
                                raise
                            await asyncio.sleep(exc.retry_after or 1)
                await asyncio.gather(*(g.result() for g in gens))
            finally:  # the job gone (cancelled call): its rows leave at the next step
                for g in gens:
                    g.cancel()
            out += [list(g.seq.tokens) for g in gens]
        return heldout_result(tok, pairs, out[: len(prompts)], out[len(prompts) :])

    def info(self) -> dict:
        return {**self.engine.stats(), "adapter_loads": len(self.load_ms),
                "load_ms_p50": sorted(self.load_ms)[len(self.load_ms) // 2] if self.load_ms else None,
                "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "base": self.cfg.model_id,
                "fingerprint": self.engine.base.fingerprint().to_dict()}
