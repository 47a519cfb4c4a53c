"""Adapters in the MLflow model registry: download by URI."""

from __future__ import annotations

from pathlib import Path


def download_adapter(uri: str, dst: str | Path | None = None) -> Path:
    """A local directory holding the adapter behind an MLflow URI (models:/NAME@ALIAS,
    models:/NAME/VERSION, runs:/RUN_ID/adapter, mlflow-artifacts:/...), from the tracking server
    named by $MLFLOW_TRACKING_URI."""
    import mlflow.artifacts

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=str(uri), dst_path=None if dst is None else str(dst)))
