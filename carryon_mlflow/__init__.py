"""The MLflow edge of carryon-ray: run tracking (`tracking`), the model registry (`registry`).

The core (`carryon_ray`) never imports MLflow: it reports through the recipe's Reporter protocol
and reads adapters from directories; `models:/`, `runs:/` and `mlflow-artifacts:/` adapter URIs
reach it through `registry.download_adapter`, registered as an entry point (pyproject.toml,
group `carryon_ray.adapter_uris`).
"""
