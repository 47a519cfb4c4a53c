"""Cluster commands of `carryon`: up, down, status (a local Ray head + MLflow server) and
customize (submit the customization job, or run its driver here)."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
from pathlib import Path

from jobs import local_cluster


def cmd_up(args) -> int:
    existing = local_cluster.status(args.state_dir)
    if args.reuse and existing and local_cluster.is_running(existing):
        print(f"reusing the running cluster: dashboard {existing['dashboard_url']}, MLflow {existing.get('mlflow_url')}")
        return 0
    state = local_cluster.up(args.state_dir, num_cpus=args.num_cpus, with_mlflow=not args.no_mlflow,
                             dashboard_port=args.dashboard_port, mlflow_port=args.mlflow_port)
    print(f"Ray head      {state['ray_address']}  (resources {state['resources']})")
    print(f"Ray dashboard {state['dashboard_url']}")
    if "mlflow_url" in state:
        print(f"MLflow UI     {state['mlflow_url']}")
    print(f"state         {Path(args.state_dir).resolve() / 'cluster.json'}  (stop with `carryon down`)")
    if args.producers:
        args.config, args.set, args.address = args.producers, [], None
        if cmd_producers_start(args) != 0:
            return 1
    if args.trainers:
        args.slots, args.address = args.trainers, None
        return cmd_trainers_start(args)
    return 0


def _connect(args) -> bool:
    """A driver on the recorded cluster (or RAY_ADDRESS / --address) that can start detached actors:
    the project's code travels as the working directory (.gitignore'd paths stay here)."""
    import logging

    state = local_cluster.status(args.state_dir) or {}
    address = getattr(args, "address", None) or os.environ.get("RAY_ADDRESS") or state.get("ray_address")
    if not address:
        print("error: no Ray cluster: run `carryon up`, set RAY_ADDRESS, or pass --address", file=sys.stderr)
        return False
    if address == state.get("ray_address"):
        os.environ.update(local_cluster.client_env(state))  # before Ray reads it
    import ray

    from actors.service import NAMESPACE
    for name in ["ray", *[n for n in logging.root.manager.loggerDict if n.startswith("ray.")]]:
        logging.getLogger(name).setLevel(logging.ERROR)
    env = {k: os.environ[k] for k in ("CARRYON_CACHE", "HF_HUB_OFFLINE") if k in os.environ}
    from jobs.backend import QUIET_ENV

    root = Path(__file__).resolve().parent.parent
    # A submitted job (`ray job submit ... -- carryon producers start`) already runs with its own
    # working directory and environment; a driver here brings the project's code along.
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    ray.init(address=address, namespace=NAMESPACE, logging_level=logging.ERROR, log_to_driver=False,
             runtime_env=None if in_job else {"working_dir": str(root), "env_vars": {**env, **QUIET_ENV}})
    return True


def cmd_producers_start(args) -> int:
    """Start the cluster's shared producer service for a config's base(s) and wait until its first
    producers have loaded their base."""
    from carryon_ray.config import ConfigError, load_config, parse_overrides

    try:
        cfg = load_config(args.config, parse_overrides(args.set))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    connected, running = _shared_service(args)  # connects before Ray is imported here (it reads the auth mode)
    if not connected:
        return 2
    import ray

    from actors.service import SHARED_NAME, start_shared

    if running is not None:
        seen = ray.get(running.describe.remote())
        print(f"producer service {SHARED_NAME} already runs for {seen['bases']} ({seen['producers']} producers); "
              "stop it first with `carryon producers stop`", file=sys.stderr)
        return 1
    service = start_shared(cfg)
    ray.get(service.wait_ready.remote(args.timeout_s))
    seen = ray.get(service.describe.remote())
    r = cfg.resources
    print(f"producers     {SHARED_NAME}: {seen['producers']} of {r.embed_actors_min}..{r.embed_actors_max} for "
          f"base {cfg.base.name} (jobs with the same base embed through them; stop with `carryon producers stop`)")
    return 0


def _shared_service(args) -> tuple[bool, object]:
    """(connected to the cluster, its running shared producer service or None)."""
    if not _connect(args):
        return False, None
    import ray

    from actors.service import NAMESPACE, SHARED_NAME

    try:
        return True, ray.get_actor(SHARED_NAME, namespace=NAMESPACE)
    except ValueError:
        return True, None


def cmd_producers_stop(args) -> int:
    connected, service = _shared_service(args)
    if not connected:
        return 2
    if service is None:
        print("no producer service runs")
        return 0
    import ray

    ray.get(service.stop.remote())
    ray.kill(service, no_restart=True)
    print("stopped the producer service")
    return 0


def _print_status(found: tuple[bool, object], what: str) -> int:
    """`carryon producers|trainers status`: the service's describe() as JSON; 1 when none runs."""
    connected, service = found
    if not connected:
        return 2
    if service is None:
        print(f"no {what} runs")
        return 1
    import ray

    print(json.dumps(ray.get(service.describe.remote()), indent=2))
    return 0


def cmd_producers_status(args) -> int:
    return _print_status(_shared_service(args), "producer service")


def _trainer_service(args) -> tuple[bool, object]:
    """(connected to the cluster, its running trainer service or None)."""
    if not _connect(args):
        return False, None
    from jobs import trainers

    return True, trainers.find()


def cmd_trainers_start(args) -> int:
    """Start the cluster's trainer service on a training-class node and wait until it answers."""
    connected, running = _trainer_service(args)
    if not connected:
        return 2
    import ray

    from jobs import trainers

    if running is not None:
        seen = ray.get(running.describe.remote())
        print(f"trainer service {trainers.TRAINERS_NAME} already runs ({seen['slots']} fits at once); stop it "
              "first with `carryon trainers stop`", file=sys.stderr)
        return 1
    service = trainers.start(args.slots, args.cpus, args.gpus, args.training_resource)
    ray.get(service.ready.remote(), timeout=args.timeout_s)
    print(f"trainers      {trainers.TRAINERS_NAME}: {args.slots} fits at once on {args.cpus:g} CPU(s) of a "
          f"{args.training_resource} node (jobs with one training worker fit there; stop with `carryon trainers stop`)")
    return 0


def cmd_trainers_stop(args) -> int:
    connected, service = _trainer_service(args)
    if not connected:
        return 2
    if service is None:
        print("no trainer service runs")
        return 0
    import ray

    busy = ray.get(service.describe.remote())["running"]
    ray.kill(service, no_restart=True)
    print("stopped the trainer service" + (f" (the fits of {', '.join(sorted(busy))} end with it: those jobs "
                                           "fail with a message that says so)" if busy else ""))
    return 0


def cmd_trainers_status(args) -> int:
    return _print_status(_trainer_service(args), "trainer service")


def cmd_down(args) -> int:
    print("stopped" if local_cluster.down(args.state_dir) else "no carryon cluster recorded here")
    return 0


def cmd_status(args) -> int:
    state = local_cluster.status(args.state_dir)
    if args.field:
        print(state.get(args.field, "") if state else "")
        return 0 if state else 1
    print(json.dumps(state, indent=2) if state else "no carryon cluster recorded here")
    return 0 if state else 1


def _targets(args) -> tuple[str | None, str | None]:
    """(dashboard address, MLflow URI): flags, then the environment, then `carryon up`'s record."""
    state = local_cluster.status(args.state_dir) or {}
    address = args.address or os.environ.get("RAY_ADDRESS") or state.get("dashboard_url")
    if address and address == state.get("dashboard_url"):
        for k, v in local_cluster.client_env(state).items():
            os.environ.setdefault(k, v)
    mlflow = os.environ.get("MLFLOW_TRACKING_URI") or state.get("mlflow_url")
    return address, mlflow


def cmd_customize(args) -> int:
    address, mlflow = _targets(args)
    job_args = ["--config", args.config] + [a for kv in args.set for a in ("--set", kv)]
    state = local_cluster.status(args.state_dir) or {}
    if address == state.get("dashboard_url") and not any(kv.startswith("output.dir=") for kv in args.set):
        # A local cluster shares this filesystem: write outputs here, not into the job's
        # temporary copy of the working directory.
        from carryon_ray.config import ConfigError, load_config, parse_overrides

        try:
            out = Path(load_config(args.config, parse_overrides(args.set)).output.dir)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        job_args += ["--set", f"output.dir={out if out.is_absolute() else Path.cwd() / out}"]
    env = {k: os.environ[k] for k in ("CARRYON_CACHE", "HF_HUB_OFFLINE") if k in os.environ}
    # no per-file progress bars in the job's log (the driver quiets Ray Data itself: jobs/customize.py);
    # on the local cluster, which shares this filesystem, Ray Data's own actors read the same logging config
    env.update({"HF_HUB_DISABLE_PROGRESS_BARS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})
    if address == state.get("dashboard_url"):
        env["RAY_DATA_LOGGING_CONFIG"] = str(Path(__file__).resolve().parent.parent / "jobs" / "ray-data-logging.yaml")
    if mlflow:
        env["MLFLOW_TRACKING_URI"] = mlflow
    if args.local:  # the driver runs here; Ray work goes to RAY_ADDRESS, the recorded cluster, or a local Ray
        from jobs.customize import main as job_main

        os.environ.update(env)
        if address and not os.environ.get("RAY_ADDRESS"):
            state = local_cluster.status(args.state_dir) or {}
            os.environ["RAY_ADDRESS"] = state.get("ray_address", address)
        return job_main(job_args)
    if not address:
        print("error: no Ray cluster: run `carryon up`, set RAY_ADDRESS, or pass --local", file=sys.stderr)
        return 2
    from ray.job_submission import JobStatus, JobSubmissionClient

    import logging

    # The job SDK's packaging notes (INFO) and its note that .git/.venv are skipped (WARNING) are Ray's
    # bookkeeping, not the run's: Ray's client loggers show errors only here.
    for name in ["ray", *[n for n in logging.root.manager.loggerDict if n.startswith("ray.")]]:
        logging.getLogger(name).setLevel(logging.ERROR)

    client = JobSubmissionClient(address if address.startswith("http") else f"http://{address}")
    entrypoint = "python -m jobs.customize " + " ".join(shlex.quote(a) for a in job_args)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(Path.cwd()), "env_vars": env})
    print(f"submitted {job_id} to {address}: {entrypoint}", flush=True)

    # The job supervisor opens every log with its own two lines (runtime env setup, the entrypoint):
    # the line above already says both. Everything the job itself prints is shown as it comes.
    preamble = (f"Running entrypoint for job {job_id}:", "job_manager.py:")

    async def tail():
        async for lines in client.tail_job_logs(job_id):
            kept = [ln for ln in lines.splitlines(keepends=True) if not any(p in ln[:120] for p in preamble)]
            print("".join(kept), end="", flush=True)

    asyncio.run(tail())
    info = client.get_job_info(job_id)
    print(f"job {job_id}: {info.status}")
    if info.status != JobStatus.SUCCEEDED:
        # The error is in the lines above; say where the whole of it is kept.
        if info.message:
            print(f"  {info.message.strip().splitlines()[0][:200]}", file=sys.stderr)
        print(f"  full log: ray job logs {job_id} --address {client.get_address()}", file=sys.stderr)
        temp = state.get("ray_temp_dir") if address == state.get("dashboard_url") else None
        if temp:
            print(f"  (on this machine: {temp}/session_latest/logs/job-driver-{job_id}.log)", file=sys.stderr)
    return 0 if info.status == JobStatus.SUCCEEDED else 1


def add_trainer_options(p) -> None:
    p.add_argument("--cpus", type=float, default=1.0, help="CPUs the trainer service holds (its fits share them)")
    p.add_argument("--gpus", type=float, default=0.0, help="GPUs the trainer service holds")
    p.add_argument("--training-resource", default="training_node", help="the node class it is placed on")


def add_commands(sub) -> None:
    def with_state(p):
        p.add_argument("--state-dir", default=local_cluster.DEFAULT_STATE, help="where `up` records the cluster")

    p = sub.add_parser("up", help="start a local Ray head (both node classes) and an MLflow server")
    with_state(p)
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--dashboard-port", type=int, default=8265)
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--reuse", action="store_true", help="do nothing if a recorded cluster is already running")
    p.add_argument("--producers", metavar="CONFIG", help="also start the shared producer service for CONFIG's base "
                   "(see `carryon producers start`)")
    p.add_argument("--trainers", metavar="N", type=int, help="also start the trainer service with N fits at once "
                   "(see `carryon trainers start`)")
    p.add_argument("--timeout-s", type=float, default=600, help="how long --producers waits for its base to load")
    add_trainer_options(p)
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("producers", help="the cluster's shared embedding producers: start, stop, status")
    psub = p.add_subparsers(dest="action", required=True)
    for action, fn, text in (("start", cmd_producers_start, "start them for a config's base(s)"),
                             ("stop", cmd_producers_stop, "stop them (jobs then start their own)"),
                             ("status", cmd_producers_status, "producers, calls, forwards shared by several jobs")):
        q = psub.add_parser(action, help=text)
        with_state(q)
        q.add_argument("--address", help="Ray address (default: RAY_ADDRESS or `carryon up`'s)")
        if action == "start":
            q.add_argument("--config", required=True, help="a job config: its base(s) and resources.embed_* fields")
            q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
            q.add_argument("--timeout-s", type=float, default=600, help="how long to wait for the bases to load")
        q.set_defaults(func=fn)
    p = sub.add_parser("trainers", help="the cluster's trainer service (many jobs' fits in one warm process): "
                       "start, stop, status")
    psub = p.add_subparsers(dest="action", required=True)
    for action, fn, text in (("start", cmd_trainers_start, "start it on a training-class node"),
                             ("stop", cmd_trainers_stop, "stop it (jobs then train on Ray Train)"),
                             ("status", cmd_trainers_status, "its fits: running, waiting, finished")):
        q = psub.add_parser(action, help=text)
        with_state(q)
        q.add_argument("--address", help="Ray address (default: RAY_ADDRESS or `carryon up`'s)")
        if action == "start":
            q.add_argument("--slots", type=int, default=4, help="fits that run at once (more wait for a slot)")
            q.add_argument("--timeout-s", type=float, default=300, help="how long to wait for it to answer")
            add_trainer_options(q)
        q.set_defaults(func=fn)
    p = sub.add_parser("down", help="stop exactly the processes `carryon up` started")
    with_state(p)
    p.set_defaults(func=cmd_down)
    p = sub.add_parser("status", help="show the recorded local cluster")
    with_state(p)
    p.add_argument("--field", help="print one field (e.g. mlflow_url, dashboard_url)")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("customize", help="submit a customization job (or run its driver here with --local)")
    with_state(p)
    p.add_argument("config", help="YAML config, relative to the working directory that is uploaded")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--address", help="Ray dashboard address (default: RAY_ADDRESS or `carryon up`'s)")
    p.add_argument("--local", action="store_true", help="run the job driver in this process")
    p.set_defaults(func=cmd_customize)
