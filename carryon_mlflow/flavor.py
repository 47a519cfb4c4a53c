"""Adapters as MLflow models (the pyfunc flavor) and the data a run trained on as MLflow inputs."""

from __future__ import annotations

from pathlib import Path

from carryon_ray import __version__

MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")


def save_pyfunc(adapter_dir: str | Path, path: str | Path) -> Path:
    """An MLflow model directory (MLmodel, the model code, the adapter as its artifact) at `path`."""
    import mlflow.pyfunc
    from mlflow.models import infer_signature

    import warnings

    signature = infer_signature(["Question: 3 + 4?\nAnswer:"], ["7"],
                                params={"max_tokens": 64, "temperature": 0.0, "seed": 0})
    with warnings.catch_warnings():
        # The signature is given explicitly; an input example would make MLflow load the base to
        # validate the model at save time.
        warnings.filterwarnings("ignore", message=".*input example", category=UserWarning)
        mlflow.pyfunc.save_model(path=str(path), python_model=str(MODEL_CODE), artifacts={"adapter": str(adapter_dir)},
                                 signature=signature, pip_requirements=[f"carryon-ray=={__version__}"])
    return Path(path)


def dataset_input(name: str, source: str, profile: list[dict], context: str):
    """A DatasetInput for a run: the data's source (path, URI or built-in) and a per-row profile
    (tokens, scored tokens, replay flag), never the text itself."""
    import mlflow.data
    import pandas as pd
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.entities import DatasetInput, InputTag

    frame = pd.DataFrame(profile).astype("float64")  # counts as floats: MLflow warns on int columns (no NaN)
    try:
        dataset = mlflow.data.from_pandas(frame, source=source, name=name)
    except Exception:  # noqa: BLE001 - a built-in or an unknown scheme: record it as a generated source
        dataset = mlflow.data.from_pandas(frame, source=CodeDatasetSource(tags={"carryon.data": source}), name=name)
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(key="mlflow.data.context", value=context)])
