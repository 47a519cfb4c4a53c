"""`carryon serve`: deploy the Serve application on the recorded local cluster (or RAY_ADDRESS)."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request

APP_NAME = "carryon"


def cmd_serve(args) -> int:
    from carryon_ray.config import ConfigError, parse_overrides
    from jobs import local_cluster
    from serve.settings import load_serve_config

    state = local_cluster.status(args.state_dir) or {}
    address = args.address or os.environ.get("RAY_ADDRESS") or state.get("ray_address")
    if not address:
        print("error: no Ray cluster: run `carryon up` or set RAY_ADDRESS", file=sys.stderr)
        return 2
    if address == state.get("ray_address"):
        os.environ.update(local_cluster.client_env(state))  # before ray is imported (token auth)
    try:
        overrides = parse_overrides(args.set)
        if state.get("mlflow_url") and "registry.tracking_uri" not in overrides:
            overrides["registry.tracking_uri"] = os.environ.get("MLFLOW_TRACKING_URI", state["mlflow_url"])
        cfg = load_serve_config(args.config, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import ray
    from ray import serve

    from serve.access import keys_summary, load_keys
    from serve.app import deployments

    try:
        keys = load_keys(cfg.auth)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    if args.stop:  # the application, Serve's controller and its HTTP proxies: nothing keeps the port
        serve.shutdown()
        print(f"stopped Serve (application {APP_NAME!r}, controller and proxies)")
        return 0
    serve.start(http_options={"host": args.host, "port": args.port}, proxy_location=args.proxy_location)
    t0 = time.time()
    serve.run(deployments(cfg, keys), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '127.0.0.1') else args.host}:{args.port}"
    with urllib.request.urlopen(f"{url}/healthz", timeout=30) as resp:
        health = json.loads(resp.read())
    print(f"serving {health['base']} with {len(cfg.adapters)} listed adapter(s) "
          f"(registry {'on' if cfg.registry.enabled else 'off'}) at {url}/v1  [{time.time() - t0:.1f}s]")
    print(f"API keys: {keys_summary(keys)}; OpenAPI document at {url}/docs")
    if cfg.finetune.enabled and cfg.finetune_tracking_uri:
        print(f"fine-tuning API: {url}/v1/files and {url}/v1/fine_tuning/jobs (records in MLflow at "
              f"{cfg.finetune_tracking_uri}; `make finetune-demo` tries it)")
    return 0


def add_commands(sub) -> None:
    from jobs import local_cluster

    p = sub.add_parser("serve", help="deploy the OpenAI-compatible Serve app (base + adapters) on the cluster")
    p.add_argument("config", nargs="?", default=None, help="serve YAML (see serve/local.yaml); default: all defaults")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--state-dir", default=local_cluster.DEFAULT_STATE, help="where `carryon up` recorded the cluster")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS or `carryon up`'s)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host of Serve's proxy (0.0.0.0 to expose it)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of Serve's proxy")
    p.add_argument("--proxy-location", default="HeadOnly", choices=["HeadOnly", "EveryNode"],
                   help="where Serve runs HTTP proxies (EveryNode on a real multi-host cluster)")
    p.add_argument("--stop", action="store_true", help="shut Serve down on the cluster instead (frees the port)")
    p.set_defaults(func=cmd_serve)
