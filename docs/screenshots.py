"""Screenshots of what a user opens after `make demo` (run by `make screenshots`; not in CI).

Headless Chromium (Debian's `chromium` package) opens, on the local cluster `carryon up` recorded:
  1. the demo experiment's chart view in the MLflow UI (the sections train/, val/, alpha/, ...),
  2. the demo run's page (params, metrics, artifacts: figures, config.yaml, the held-out table),
  3. the registered model demo-topics (its versions and the alias serving loads),
and, when `make serve` is up, 4. the Serve app's /docs page (Swagger UI served from the package, so it
must render with no network). PNGs go to docs/img/, which the README shows. Each page is checked for
text a working page shows (a blank or error page fails the script).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    raise SystemExit("headless Chromium not found: apt-get install chromium (Debian's package)")


def shoot(browser: str, url: str, out: Path, expect: list[str], size: str = "1500,1000", wait_ms: int = 15000) -> None:
    """A PNG of `url`, and its rendered DOM checked for every string in `expect`."""
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={size}",
             f"--virtual-time-budget={wait_ms}", "--run-all-compositor-stages-before-draw"]
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, *flags, f"--user-data-dir={profile}", f"--screenshot={out}", url], check=True,
                       capture_output=True, timeout=180)
        dom = subprocess.run([browser, *flags, f"--user-data-dir={profile}", "--dump-dom", url], check=True,
                             capture_output=True, text=True, timeout=180).stdout
    missing = [e for e in expect if e not in dom]
    if missing:
        raise SystemExit(f"{url}: the page does not show {missing} (see {out})")
    print(f"{out.relative_to(ROOT)}: {url}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experiment", default="carryon-demo")
    p.add_argument("--model", default="demo-topics")
    p.add_argument("--serve-url", default="http://127.0.0.1:8000")
    p.add_argument("--out", default=str(ROOT / "docs" / "img"))
    args = p.parse_args()
    from jobs import local_cluster
    from mlflow.tracking import MlflowClient

    state = local_cluster.status(local_cluster.DEFAULT_STATE) or {}
    url = state.get("mlflow_url")
    if not url:
        raise SystemExit("no local cluster recorded: run `make demo` first")
    client = MlflowClient(url)
    exp = client.get_experiment_by_name(args.experiment)
    if exp is None:
        raise SystemExit(f"no experiment {args.experiment!r} at {url}: run `make demo` first")
    run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    browser = chromium()
    ml = "workflowType=machine_learning"  # MLflow 3.17's UI opens in its GenAI workflow unless told
    shoot(browser, f"{url}/#/experiments/{exp.experiment_id}/runs?{ml}&compareRunsMode=CHART",
          out / "mlflow-charts.png", [run.info.run_name])
    shoot(browser, f"{url}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}?{ml}", out / "mlflow-run.png",
          [run.info.run_name])
    shoot(browser, f"{url}/#/models/{args.model}?{ml}", out / "mlflow-model.png", [args.model])
    try:
        urllib.request.urlopen(f"{args.serve_url}/docs", timeout=5).read()
    except OSError:
        print(f"{args.serve_url}/docs not reachable: `make serve` to include the Serve app's /docs page")
    else:
        shoot(browser, f"{args.serve_url}/docs", out / "serve-docs.png", ["swagger-ui"])
    print(json.dumps({"experiment": exp.experiment_id, "run": run.info.run_id, "out": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
