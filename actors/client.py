"""The client side of the embedding producers, for any caller that embeds rows (a Ray job's
pipeline, a fine-tuning API job's process): which producers a job uses (the co-serving replicas
of a Serve app, the cluster's shared service, or the job's own service), and the calls a job makes
on them: calibrate its bridges, embed its rows (a lazy Ray Dataset, or lists in order), score a
held-out set, and forget the job when it ends.
"""

from __future__ import annotations

import logging

log = logging.getLogger("carryon.job")


class ProducersUnavailable(RuntimeError):
    """resources.producers names producers that do not run the job's bases (a message for the user)."""


class NotRunning(LookupError):
    """No co-serving replicas or shared producers run the job's bases (and none may be started)."""


class Producers:
    """The embedding producers a job embeds through (actors/service.py), by resources.producers:
    the model replicas of the Serve app that runs the job's bases (co-serving), else the cluster's
    shared producer service for them, else the job's own service, started here and stopped by
    `close` (before held-out scoring needs the node). `kind` says which: coserve, shared, job."""

    def __init__(self, cfg, job: str, scheduling=None, start_own: bool = True):
        import ray

        from actors.service import COSERVE, SHARED_NAME, find_coserving, find_shared, start_for_job

        self.cfg, self.job, self.own, self.kind = cfg, job, None, "job"
        mode, r = cfg.resources.producers, cfg.resources
        coserving = find_coserving(cfg) if mode in ("auto", "coserve") else None
        shared = find_shared(cfg) if coserving is None and mode in ("auto", "shared") else None
        if mode == "coserve" and coserving is None:
            raise ProducersUnavailable(
                f"resources.producers is 'coserve' but the Serve app {r.coserve_app!r} does not run base "
                f"{cfg.base.name!r}: deploy it (`carryon serve`) with the same base, set "
                "resources.coserve_app to the app that does, or set resources.producers=auto")
        if mode == "shared" and shared is None:
            raise ProducersUnavailable(
                f"resources.producers is 'shared' but no producer service runs for base {cfg.base.name!r} "
                "on this cluster: start one with `carryon up --producers CONFIG` (the same base), or "
                "set resources.producers=auto to use the job's own producers")
        if coserving is not None:
            self.name, self.groups, self.kind = f"{COSERVE}{r.coserve_app}", [None], "coserve"
            self.replicas = coserving
            log.info("embedding through the model replicas of the Serve app %r (co-serving)", r.coserve_app)
        elif shared is not None:
            self.name, self.groups, self.kind = SHARED_NAME, [None], "shared"
            log.info("embedding through the cluster's shared producers (%s)", SHARED_NAME)
        elif not start_own:
            raise NotRunning(f"no co-serving replicas or shared producers run base {cfg.base.name!r}")
        else:
            self.own = start_for_job(cfg, job, scheduling)
            self.name = f"carryon-producers-{job}"
            self.groups = ray.get(self.own.__ray_call__.remote(lambda s: s.groups))
        self.calibration = None
        self.seen: dict | None = None

    @classmethod
    def running(cls, cfg, job: str) -> "Producers | None":
        """The producers that already run `cfg`'s bases (the co-serving replicas, else the shared
        service), or None: nothing is started. What a fine-tuning job's actor embeds through."""
        try:
            return cls(cfg, job, start_own=False)
        except NotRunning:
            return None

    def _calibration_ref(self, calib):
        import ray

        if self.calibration is None:
            self.calibration = ray.put(calib)  # one copy; each producer fetches it once per job
        return self.calibration

    def embed_rows(self, calib, rows: list[dict], progress, what: str) -> dict:
        """For a caller without Ray Data (the in-process backend of a fine-tuning job): token rows ->
        embedding rows, in order, through these producers; blocks of a few requests each, every
        block passed through `progress` (which checks for a cancel between them)."""
        from actors.service import embed_through_producers
        from carryon_ray.embedding import columns, concat_rows

        r, ref = self.cfg.resources, [self._calibration_ref(calib)]
        per = r.embed_batch_size * max(2, r.embed_actors_max)
        starts = range(0, len(rows), per)
        outs = []
        for at in progress(starts, f"base forward ({what}, {self.kind} producers)", len(starts)):
            block = columns(rows[at : at + per])
            for i, group in enumerate(self.groups):
                block = embed_through_producers(block, self.name, self.job, ref, group, i == len(self.groups) - 1,
                                                r.embed_batch_size)
            outs.append(block)
        return concat_rows(outs)

    def pipeline(self, ds, calib):
        """A lazy Ray Dataset: token rows (a Dataset from jobs/data.py) -> embedding rows. One
        stage per producer group (model mixing with a pool per base chains them: each base is
        placed and scaled on its own and the bases run concurrently on different blocks)."""
        import ray
        from ray.data import TaskPoolStrategy
        from ray.data.dataset import MaterializedDataset

        from actors.service import embed_through_producers

        if self.calibration is None:
            self._calibration_ref(calib)
            if self.own is not None:  # as an actor pool does: its first embed_actors_min producers up before
                ray.get(self.own.wait_ready.remote())  # streaming, else the first one takes every block
        r = self.cfg.resources
        tasks = max(2, r.embed_actors_max)
        if isinstance(ds, MaterializedDataset):  # no more tasks than blocks: a cap above them earns a Ray Data warning
            tasks = max(1, min(tasks, ds.num_blocks()))
        for i, group in enumerate(self.groups):
            # `ds` is in blocks of a few requests each (jobs/data.py: _blocks); a task sends its
            # block's requests at once and waits (no CPU); at most embed_actors_max blocks of this
            # job are in flight: its backpressure, and few worker processes to start.
            ds = ds.map_batches(
                embed_through_producers,
                fn_kwargs=dict(service=self.name, job=self.job, calibration=[self.calibration], group=group,
                               last=i == len(self.groups) - 1, rows=r.embed_batch_size),
                batch_size=None, batch_format="numpy",
                compute=TaskPoolStrategy(size=tasks), num_cpus=0,
            )
        return ds

    def calibrate(self, data):
        """The job's bridges fitted on a producer that has the base(s) loaded (no base load of its
        own), or None when the producers each run one base of several (model mixing)."""
        if self.groups != [None]:
            return None
        cfg = self.cfg
        if self.kind == "coserve":
            from actors.service import replica_call

            return replica_call(cfg.resources.coserve_app, "calibrate", cfg.bridge.model_dump(), cfg.layers.shallow,
                                data.calibration_rows, cfg.tap_spec(), what=f"the calibration of job {self.job}")
        return self._on_a_producer(lambda p: p.calibrate.remote(cfg.bridge.model_dump(), cfg.layers.shallow,
                                                                data.calibration_rows, cfg.tap_spec()))

    def score_heldout(self, cfg_json: dict, files: dict[str, bytes]) -> dict | None:
        """The held-out comparison where the base(s) are loaded already: on a co-serving replica
        (its rows decode beside the users'), or on a producer (the job's own or the shared ones);
        None when none can: one base per producer, or the job's own producers already stopped."""
        if self.kind == "coserve":
            from actors.service import replica_call

            return replica_call(self.cfg.resources.coserve_app, "score_heldout", cfg_json, files,
                                what=f"the held-out answers of job {self.job}")
        if self.groups != [None] or (self.kind == "job" and self.own is None):
            return None
        return self._on_a_producer(lambda p: p.score_heldout.remote(cfg_json, files))

    def _on_a_producer(self, call):
        """`call(producer)`'s result on one producer taken from the service (least loaded), or None
        when three in a row were lost meanwhile (Ray restarts them). The producer is released
        whatever happens; an error of the call itself (the job's input) is the job's."""
        import ray

        from actors.service import NAMESPACE

        service = ray.get_actor(self.name, namespace=NAMESPACE)
        for _ in range(3):
            i, producer = ray.get(service.acquire.remote(None))
            failed = True
            try:
                out = ray.get(call(producer))
                failed = False
                return out
            except ray.exceptions.RayActorError:
                continue
            finally:
                service.release.remote(None, i, failed=failed)
        return None

    def describe(self) -> dict:
        import ray
        from actors.service import NAMESPACE

        try:
            if self.kind == "coserve":  # one replica's engine (Serve picks which)
                info = self.replicas.info.remote().result(timeout_s=30)
                return {"owner": "coserve", "replica": {k: info.get(k) for k in ("beside_done", "beside_tokens",
                                                                                 "beside_waiting", "steps", "node_id",
                                                                                 "pid")}}
            return ray.get(ray.get_actor(self.name, namespace=NAMESPACE).describe.remote(), timeout=30)
        except Exception as exc:  # noqa: BLE001 - a description is best effort
            return {"error": str(exc)}

    def close(self) -> None:
        import ray

        if self.kind == "shared":  # the service outlives the job: it drops what the job left queued
            from actors.service import NAMESPACE

            try:
                ray.get_actor(self.name, namespace=NAMESPACE).forget.remote(self.job)
            except Exception:  # noqa: BLE001 - best effort: a queued request of a gone job only costs time
                pass
        if self.own is not None:
            self.seen = self.describe()  # what the job's own producers did, before they go
            try:
                ray.get(self.own.stop.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - killing it below ends its producers too
                pass
            ray.kill(self.own, no_restart=True)
            self.own = None
