"""The Serve application: an OpenAI-compatible REST API over one base and many carry-on adapters.

Two deployments:

  Gateway      the HTTP ingress (FastAPI). Checks the bearer key before reading a body, streams
               the body in up to its limit, validates the request, bounds what one key may have in
               flight, decides which adapter the caller may use (see access.py), and forwards a
               typed GenerateRequest to a model replica with the adapter as Serve's multiplexed
               model id, so requests for an adapter go to replicas that already hold it. Also the
               OpenAI fine-tuning API (finetune/): files and jobs, each job a detached Ray actor.
  ModelServer  pinned to the inference-class resource. Holds the base once, an LRU of adapters
               (`serve.multiplexed`), and one decode engine (serve/async_engine.py) that admits and
               retires rows at every decoding step: rows of every adapter share each step's base
               forward, no request waits for a batch-mate, and a request whose client went away
               frees its row at the next step.

The modules: replica.py (ModelServer), gateway.py (Gateway: what each route does), routes.py
(HTTP -> gateway calls; the app is built per gateway replica), http_api.py (the app factory: the
one key guard, error bodies, OpenAPI, offline docs, Prometheus text), async_engine.py (the replica's
engine thread and text streams), protocol.py (wire formats); this file only builds the application.

Failures cross from replica to gateway as `ServeError` exceptions carrying their HTTP status; a
replica that dies mid-request answers 503 with Retry-After. Run it with `carryon serve FILE`,
`serve run serve.app:build config=FILE`, or `serve deploy serve/config.yaml`.
"""

from typing import Any

from .access import load_keys
from .gateway import Gateway
from .replica import ModelServer
from .settings import ServeConfig, load_serve_config

__all__ = ["Gateway", "ModelServer", "build", "deployments"]


# ---------------------------------------------------------------------------------------------
# Application builder
# ---------------------------------------------------------------------------------------------


def deployments(cfg: ServeConfig, key_digests: dict[str, str]):
    """The bound application for a validated config (resources and scaling from config)."""
    r = cfg.replicas
    # Serve's lines (each request's access line, above all) go to its own log files (logs/serve/,
    # the dashboard's Serve page), not to the replicas' stderr, which Ray can forward to other
    # jobs' drivers: in bench/shared_producers.py a co-serving job's log held every user's request.
    quiet = {"env_vars": {"RAY_SERVE_LOG_TO_STDERR": "0"}}
    actor = {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus, "runtime_env": quiet}
    if r.resource_units > 0:
        actor["resources"] = {r.resource: r.resource_units}
    scaling: dict[str, Any] = {"num_replicas": r.min_replicas} if r.min_replicas == r.max_replicas else {
        "autoscaling_config": {"min_replicas": r.min_replicas, "max_replicas": r.max_replicas,
                               "target_ongoing_requests": r.target_ongoing_requests}}
    settings = cfg.model_dump()
    # No access line per call on the model replicas: the gateway's access log has every user
    # request, and a co-serving job's chunks are hundreds of calls.
    model = ModelServer.options(ray_actor_options=actor, max_ongoing_requests=r.max_ongoing_requests,
                                logging_config={"enable_access_log": False}, **scaling).bind(settings)
    gateway = Gateway.options(num_replicas=cfg.gateway.replicas,
                              ray_actor_options={"num_cpus": cfg.gateway.num_cpus, "runtime_env": quiet},
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
