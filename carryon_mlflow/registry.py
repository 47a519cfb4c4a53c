"""Adapters in the MLflow model registry: download by URI, through a local cache of immutable
versions.

A registered version (models:/NAME/VERSION) or a run's artifact (runs:/RUN_ID/...) never changes,
so it is downloaded once per machine into $CARRYON_CACHE/registry and read from there afterwards
(a serving replica that evicts an adapter from its LRU reloads it in milliseconds instead of a
registry round trip). An alias (models:/NAME@ALIAS) is resolved to its version on every call, so a
moved alias is seen at once. The adapter's own SHA-256 check still runs on every load.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

_ALIAS = re.compile(r"^models:/([^/@]+)@(.+)$")


def _cache_root() -> Path:
    return Path(os.environ.get("CARRYON_CACHE", Path.home() / ".cache" / "carryon-ray")) / "registry"


def download_adapter(uri: str, dst: str | Path | None = None) -> Path:
    """A local directory holding the adapter behind an MLflow URI (models:/NAME@ALIAS,
    models:/NAME/VERSION, runs:/RUN_ID/adapter, mlflow-artifacts:/...), from the tracking server
    named by $MLFLOW_TRACKING_URI. When the URI names an MLflow model (an MLmodel file), the
    adapter directory inside it is returned."""
    import mlflow
    import mlflow.artifacts

    uri = str(uri)
    alias = _ALIAS.match(uri)
    if alias:  # mutable: resolve to the immutable version first (one registry call)
        from mlflow.tracking import MlflowClient

        version = MlflowClient().get_model_version_by_alias(alias.group(1), alias.group(2)).version
        uri = f"models:/{alias.group(1)}/{version}"
    if dst is not None:
        return _adapter_inside(Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst))))
    key = hashlib.sha256(f"{mlflow.get_tracking_uri()}|{uri}".encode()).hexdigest()[:24]
    cached = _cache_root() / key
    if not cached.is_dir():
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cached.parent))
        try:
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
            if got != tmp:  # a single artifact directory: keep its content at the cache key
                got.rename(tmp.with_name(tmp.name + "-content"))
                shutil.rmtree(tmp)
                tmp = tmp.with_name(tmp.name + "-content")
            tmp.rename(cached)  # atomic: concurrent loaders never see half a download
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not cached.is_dir():
                raise
    return _adapter_inside(cached)


def _adapter_inside(path: Path) -> Path:
    """The adapter directory of a download: itself, or the adapter artifact of an MLflow model."""
    if (path / "MLmodel").is_file():
        inner = path / "artifacts" / "adapter"
        if inner.is_dir():
            return inner
    return path
