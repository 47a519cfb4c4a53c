"""The customization job: base forward on inference-class actors, carry-on fitting on Ray Train.

    ray job submit --working-dir . -- python -m jobs.customize --config configs/demo.yaml

A thin runner. The story of a run (data -> calibrate -> embed -> fit with alpha per epoch ->
save -> held-out -> summary) is carryon_ray.pipeline.customize, the one `carryon train` runs;
jobs/backend.py says where each step runs on the cluster (`RayBackend`). Around them, tracked_run
opens the MLflow run and ends it FAILED on any error, and the adapter is logged and registered
(carryon_mlflow.tracking.registration). A failure exits non-zero with one clear message.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .backend import QUIET_ENV, JobError, RayBackend


def run(cfg) -> dict:
    """Run one customization on the Ray cluster; returns its summary. Raises JobError / ConfigError on bad input."""
    from carryon_mlflow.tracking import registration, tracked_run
    from carryon_ray.pipeline import customize

    with tracked_run(cfg) as tracker, RayBackend(cfg, tracker) as backend:
        return customize(cfg, backend, tracker.reporter, registration(tracker))


def main(argv: list[str] | None = None) -> int:
    from carryon_ray.config import ConfigError, load_config, parse_overrides

    p = argparse.ArgumentParser(prog="python -m jobs.customize", description="Run one carry-on customization on Ray.")
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    args = p.parse_args(argv)
    for k, v in QUIET_ENV.items():  # before Ray Data is imported: it reads its logging config then
        os.environ.setdefault(k, v)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, parse_overrides(args.set))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = run(cfg)
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    brief = {k: v for k, v in summary.items() if k not in ("history", "train_losses", "last_epoch", "heldout")}
    if summary.get("heldout"):
        brief["heldout"] = {k: v for k, v in summary["heldout"].items() if k != "examples"}
    print("RESULT " + json.dumps(brief))  # the whole summary is summary.json in output.dir (the story logs the losses)
    return 0


if __name__ == "__main__":
    sys.exit(main())
