"""A fine-tuning job request, the customization config it runs with, and the OpenAI objects.

The request's fields are OpenAI's (`model`, `training_file`, `validation_file`, `suffix`, `seed`,
`metadata`, `method.supervised.hyperparameters` and the deprecated top-level `hyperparameters`);
our own settings travel in one extension object, `carryon`, which is a partial job YAML validated
by the job YAML's schema (CarryOnConfig), so its errors name the field the same way
(`carryon.carryon.rank: bad value 0; ...`). A job never names a path: its data come from file ids,
its base is the served one.
"""

from __future__ import annotations

import copy
import re
import secrets
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from carryon_ray.config import CarryOnConfig, ConfigError, validation_message

STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
ACTIVE = ("validating_files", "queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")
SUFFIX_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Sections of the job YAML a request may set in `carryon`, and the data fields it may not (paths).
EXTENSION_SECTIONS = ("carryon", "head", "alpha", "bridge", "layers", "train", "data")
NO_PATHS = ("train", "val", "general_val", "replay", "builtin_size")


class ApiError(ValueError):
    """A request the API refuses: status, message, the field (param) and a code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: Union[Literal["auto"], int] = Field("auto", description="Passes over the training file (1-50).")
    batch_size: Union[Literal["auto"], int] = Field("auto", description="Rows per optimizer step (1-256).")
    learning_rate_multiplier: Union[Literal["auto"], float] = Field(
        "auto", description="Scales the carry-on's default learning rate (0-10].")

    @field_validator("n_epochs")
    @classmethod
    def _epochs(cls, v):
        if v != "auto" and not 1 <= v <= 50:
            raise ValueError("must be 'auto' or an integer from 1 to 50")
        return v

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v):
        if v != "auto" and not 1 <= v <= 256:
            raise ValueError("must be 'auto' or an integer from 1 to 256")
        return v

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _lr(cls, v):
        if v != "auto" and not 0 < v <= 10:
            raise ValueError("must be 'auto' or a number in (0, 10]")
        return v


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised"] = Field(..., description="Only supervised fine-tuning (no dpo, no reinforcement).")
    supervised: Supervised | None = None


class JobCreate(BaseModel):
    """POST /v1/fine_tuning/jobs (OpenAI's fields, plus `carryon`)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., description="A base this server serves.")
    training_file: str = Field(..., description="A file id (purpose fine-tune) of this key's user.")
    validation_file: str | None = None
    suffix: str | None = Field(None, description="Up to 64 of A-Z a-z 0-9 . _ -; part of fine_tuned_model.")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = Field(None, description="Up to 16 pairs; keys <= 64, values <= 512 chars.")
    method: Method | None = None
    hyperparameters: Hyperparameters | None = Field(None, description="Deprecated by OpenAI: use method.")
    integrations: list | None = Field(None, description="Not supported (must be empty).")
    carryon: dict[str, Any] | None = Field(
        None, description="carryon-ray settings: a partial job YAML (sections carryon, head, alpha, bridge, "
        "layers, train, data), validated by the job YAML's schema.")

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v):
        if v is not None and not SUFFIX_RE.match(v):
            raise ValueError("up to 64 characters of A-Z a-z 0-9 . _ -")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v):
        if v is not None and (len(v) > 16 or any(len(k) > 64 or len(x) > 512 for k, x in v.items())
                              or any(not re.match(r"^[A-Za-z0-9._-]+$", k) for k in v)):
            raise ValueError("at most 16 pairs; keys of up to 64 of A-Z a-z 0-9 . _ -, values up to 512 characters")
        return v

    @field_validator("integrations")
    @classmethod
    def _integrations(cls, v):
        if v:
            raise ValueError("integrations are not supported by this server (metrics are in MLflow)")
        return v

    def hyper(self) -> Hyperparameters:
        if self.method is not None and self.hyperparameters is not None:
            raise ApiError(400, "give hyperparameters in method.supervised only (the top-level field is deprecated)",
                           "hyperparameters")
        if self.method is not None:
            return (self.method.supervised or Supervised()).hyperparameters
        return self.hyperparameters or Hyperparameters()


def parse_request(body: dict) -> JobCreate:
    try:
        return JobCreate.model_validate(body)
    except ValidationError as exc:
        e = exc.errors()[0]
        loc = ".".join(str(p) for p in e["loc"] if not re.match(r"^(int|float|str|literal\[.*\]|function-.*)$", str(p)))
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{loc}: {msg}", loc or None) from None


def _merge(into: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v
    return into


def job_config(req: JobCreate, defaults: dict, base: dict, seed: int, train_path: str, val_path: str | None,
               out_dir: str, tracking_uri: str | None, experiment: str, register_as: str, user: str,
               coserve_app: str | None = None) -> CarryOnConfig:
    """The CarryOnConfig a job runs with: the service's defaults, the request's `carryon` settings,
    its hyperparameters, then what only the service decides (base, data files, tracking, output,
    and the Serve application whose replicas run its base forward)."""
    ext = req.carryon or {}
    for section, value in ext.items():
        if section not in EXTENSION_SECTIONS:
            raise ApiError(400, f"carryon.{section}: not settable through the API (allowed: "
                           f"{', '.join(EXTENSION_SECTIONS)})", f"carryon.{section}")
        if not isinstance(value, dict):
            raise ApiError(400, f"carryon.{section}: must be an object", f"carryon.{section}")
    for name in NO_PATHS:
        if name in ext.get("data", {}):
            raise ApiError(400, f"carryon.data.{name}: a job's data come from training_file and validation_file "
                           "(file ids), never from a path", f"carryon.data.{name}")
    data = _merge(copy.deepcopy(defaults), copy.deepcopy(ext))
    h = req.hyper()
    train = data.setdefault("train", {})
    if h.n_epochs != "auto":
        train["epochs"] = h.n_epochs
    if h.batch_size != "auto":
        train["batch_size"] = h.batch_size
    if h.learning_rate_multiplier != "auto":
        lr = train.get("lr", CarryOnConfig.model_fields["train"].default_factory().lr)
        train["lr"] = lr * h.learning_rate_multiplier
    train["seed"] = seed
    train.setdefault("progress_s", 10.0)
    data.setdefault("data", {}).update({"train": train_path, "val": val_path})
    if coserve_app is not None:
        data.setdefault("resources", {})["coserve_app"] = coserve_app
    data.update({"base": base, "output": {"dir": out_dir}, "eval": {"heldout": None},
                 "mlflow": {"tracking_uri": tracking_uri, "experiment": experiment, "register_as": register_as,
                            "owner": user, "shared": False, "alias": "current"}})
    try:
        return CarryOnConfig.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, validation_message(exc, "carryon settings").replace("\n  ", " ").replace(
            "invalid carryon settings: ", "carryon: "), "carryon") from None
    except ConfigError as exc:
        raise ApiError(400, str(exc), "carryon") from None


def effective_hyperparameters(cfg: CarryOnConfig, defaults: dict) -> dict:
    base_lr = (defaults.get("train") or {}).get("lr", CarryOnConfig.model_fields["train"].default_factory().lr)
    return {"n_epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size,
            "learning_rate_multiplier": round(cfg.train.lr / base_lr, 6)}


def new_seed() -> int:
    return secrets.randbelow(2**31 - 1)


# -- names -----------------------------------------------------------------------------------------
def model_name(base_id: str, user: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's form: ft:<base>:<owner>:<suffix>:<job id> (the job id makes it never reused)."""
    return f"ft:{base_id}:{user}:{suffix or ''}:{job_id}"


def checkpoint_name(model: str, step: int) -> str:
    return f"{model}:ckpt-step-{step}"


def parse_model_name(name: str) -> tuple[str, int | None] | None:
    """(job id, checkpoint step or None) of an ft: model name, or None when it is not one."""
    parts = name.split(":")
    if len(parts) not in (5, 6) or parts[0] != "ft" or not parts[4].startswith("ftjob-"):
        return None
    if len(parts) == 5:
        return parts[4], None
    m = re.match(r"^ckpt-step-(\d{1,9})$", parts[5])
    return (parts[4], int(m.group(1))) if m else None


# -- OpenAI objects ----------------------------------------------------------------------------------
def job_object(rec: dict, mlflow_url: str | None) -> dict:
    """FineTuningJob, from a job record."""
    hp = rec.get("hyperparameters") or {}
    out = {"id": rec["id"], "object": "fine_tuning.job", "created_at": rec["created_at"], "model": rec.get("model"),
           "organization_id": rec.get("user"), "status": rec.get("status", "validating_files"),
           "training_file": rec.get("training_file"), "validation_file": rec.get("validation_file"),
           "fine_tuned_model": rec.get("fine_tuned_model"), "finished_at": rec.get("finished_at"),
           "error": rec.get("error"), "hyperparameters": hp, "seed": rec.get("seed"),
           "trained_tokens": rec.get("trained_tokens"), "result_files": rec.get("result_files") or [],
           "estimated_finish": rec.get("estimated_finish") if rec.get("status") in ACTIVE else None,
           "integrations": [], "metadata": rec.get("metadata"), "suffix": rec.get("suffix"),
           "user_provided_suffix": rec.get("suffix"),
           "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}}
    link = f"{mlflow_url.rstrip('/')}/#/experiments/{rec['experiment_id']}/runs/{rec['run_id']}" if mlflow_url else None
    out["carryon"] = {"settings": rec.get("settings"), "mlflow_run_id": rec["run_id"], "mlflow_run_url": link,
                      "progress": rec.get("progress"), "result": rec.get("result"),
                      "cancel_requested": rec.get("cancel_requested", False)}
    return out


def file_object(rec: dict) -> dict:
    info = rec.get("info") or {}
    bad = info.get("bad_rows", 0)
    details = None
    if bad:
        details = (f"{bad} of {info.get('rows')} rows will be skipped: "
                   + "; ".join(f"line {ln}: {why}" for ln, why in info.get("bad_lines", [])[:5]))
    return {"id": rec["id"], "object": "file", "bytes": rec["bytes"], "created_at": rec["created_at"],
            "filename": rec["filename"], "purpose": rec["purpose"], "status": "processed", "expires_at": None,
            "status_details": details}


def page(items: list[dict], after: str | None, limit: int) -> dict:
    """A cursor page (newest first): the items after the one with id `after`."""
    if after is not None:
        ids = [i["id"] for i in items]
        if after not in ids:
            raise ApiError(400, f"after: {after!r} is not an id in this list", "after")
        items = items[ids.index(after) + 1:]
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit,
            "first_id": items[0]["id"] if items[:limit] else None,
            "last_id": items[:limit][-1]["id"] if items[:limit] else None}
