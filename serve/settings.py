"""The typed configuration of the serving application (the schema of serve YAML files).

One file says which base the replicas hold, which adapters exist and who may call them, how API
keys are read, the request limits, and the replica resources and autoscaling range. `build()` in
serve/app.py takes these fields as Serve application args, so the same YAML body works with
`carryon serve FILE`, `serve run serve.app:build config=FILE` and under `args:` in a `serve deploy`
config.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from carryon_ray.config import (BaseModelConfig, ConfigError, Strict, apply_overrides, read_yaml_mapping,
                                validation_message)

# Public adapter names: letters, digits, '.', '_', '-'; never a path (no '/', no '..').
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def valid_name(name: str) -> bool:
    return bool(NAME_RE.match(name)) and ".." not in name


class AdapterEntry(Strict):
    """One adapter the service offers under a public name."""

    name: str = Field(..., description="Public model id clients put in the `model` field.")
    source: str = Field(
        ..., description="Adapter directory on the replicas' filesystem, or an MLflow URI "
        "(models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/adapter)."
    )
    owner: str | None = Field(None, description="User (API-key owner) who may call it.")
    shared: bool = Field(False, description="Every authenticated user may call it.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not valid_name(v):
            raise ValueError("use letters, digits, '.', '_' and '-' (no '/', no '..'), at most 128 characters")
        return v


class RegistryConfig(Strict):
    """Adapters discovered in the MLflow model registry (what the customization job registers)."""

    enabled: bool = Field(True, description="Look up model ids in the registry when not listed under `adapters`.")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI.")
    alias: str = Field("current", description="Registry alias served for a registered model NAME.")
    refresh_s: float = Field(
        30.0, ge=0, description="How long a registry answer (the listing with owner tags, alias -> version) is "
        "reused; a moved alias is served within this time."
    )
    cache_size: int = Field(
        1024, ge=1, description="Entries kept in each registry lookup cache (per-user visible sets, alias -> "
        "version), least recently used evicted."
    )


class AuthConfig(Strict):
    """API keys (bearer tokens) and the users they belong to. Never written in this file."""

    keys_file: str | None = Field(
        None, description="YAML/JSON mapping of key -> user. A key may be given as 'sha256:<hex>' "
        "so the file holds no usable secret."
    )
    keys_env: str = Field(
        "CARRYON_API_KEYS", description="Environment variable with 'key=user' pairs separated by commas."
    )
    admins: list[str] = Field(
        default_factory=list, description="Users who may read replica statistics at GET /v1/carryon/stats."
    )
    allow_anonymous: bool = Field(
        False, description="Requests without a key act as user 'anonymous' (sees only shared adapters). "
        "For local experiments only."
    )


class LimitsConfig(Strict):
    """What one request (and one key) may ask for: no request can hold a replica."""

    max_tokens: int = Field(256, ge=1, description="Largest max_tokens a request may set (also the default cap).")
    default_max_tokens: int = Field(64, ge=1, description="max_tokens when the request omits it (capped at max_tokens).")
    max_prompt_tokens: int = Field(1024, ge=1, description="Longest prompt, in tokens after the chat template.")
    max_request_prompt_tokens: int = Field(
        2048, ge=1, description="Prompt tokens of one request, all its prompts and choices together.")
    max_prompt_chars: int = Field(32_000, ge=1, description="Longest prompt text, checked before tokenizing.")
    max_stop: int = Field(4, ge=0, description="Most stop strings per request.")
    max_prompts: int = Field(8, ge=1, description="Most prompts in one /v1/completions request (list form).")
    max_n: int = Field(4, ge=1, description="Most choices (n) per prompt.")
    alpha_max: float = Field(2.0, ge=0, description="Upper bound of the carryon_alpha override.")
    max_body_bytes: int = Field(
        1_000_000, ge=1024, description="Largest request body; enforced while the body streams in (chunked bodies "
        "included), after the key is checked.")
    request_timeout_s: float = Field(
        300.0, gt=0, description="A request still generating after this long is ended (504); its row is freed.")
    max_concurrent_per_key: int = Field(
        16, ge=1, description="Requests one API key may have in flight per gateway replica; more answer 429 with "
        "Retry-After.")


class EngineConfig(Strict):
    """The decode engine of each replica: iteration-level scheduling over one base."""

    max_rows: int = Field(32, ge=1, description="Rows decoded together in one step (one base forward for all).")
    prefill_tokens: int = Field(
        256, ge=1, description="Prompt tokens prefilled per step: a long prompt is fed in chunks of at most this many, "
        "so it delays every running row's next token by at most one such chunk.")
    prefill_tokens_decoding: int = Field(
        32, ge=1, description="Prompt tokens per step while other rows decode (at most prefill_tokens): each one "
        "delays their next token. Measured on a 2-core CPU with 16 rows decoding: 32 keeps their inter-token latency "
        "under 2x while a 1,000-token prompt is fed; raise it on GPUs, where a prompt chunk rides on a decode step "
        "almost free.")
    forward: Literal["flat", "padded"] = Field(
        "flat", description="flat: each step's decode tokens and prompt chunks go through the base in ONE forward "
        "(the engine's own layer loop; Llama, Mistral and Qwen2 blocks; other bases fall back to padded). "
        "padded: Hugging Face's forward, one padded batch for decode rows and one for prompt chunks.")
    max_waiting: int = Field(
        512, ge=0, description="Requests queued for a row beyond max_rows; more answer 503 with Retry-After.")
    embed_tokens: int = Field(
        256, ge=1, description="Co-serving: the most padded tokens in one chunk of a job's embedding rows (the size "
        "used while no user row decodes; while rows decode, chunks shrink to about embed_share of a step).")
    embed_share: float = Field(
        0.5, gt=0, le=4, description="Co-serving: while users' rows decode, jobs' embedding chunks take at most this "
        "fraction of the decode steps' measured time (0.5: each user token at most about 1.5x as slow). Lower "
        "favours users, higher the jobs.")


class ReplicaConfig(Strict):
    """Model replicas: each holds the base once and a bounded LRU of adapters."""

    min_replicas: int = Field(1, ge=0, description="Autoscaling lower bound.")
    max_replicas: int = Field(1, ge=1, description="Autoscaling upper bound.")
    target_ongoing_requests: float = Field(8.0, gt=0, description="Autoscaling target of in-flight requests per replica.")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests a replica accepts before Serve queues them elsewhere.")
    max_adapters: int = Field(32, ge=1, description="Adapters kept loaded per replica (least recently used evicted).")
    resource: str = Field(
        "inference_node", description="Custom resource of the inference-class nodes (same name as the job's "
        "resources.inference_resource and cluster.yaml)."
    )
    resource_units: float = Field(1.0, ge=0, description="Units of `resource` per replica (0 = not pinned).")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (the base runs on cuda when > 0 and device is auto).")


class GatewayConfig(Strict):
    """The HTTP ingress: authentication, validation, routing by adapter."""

    replicas: int = Field(1, ge=1, description="Ingress replicas.")
    num_cpus: float = Field(0.1, ge=0, description="CPUs per ingress replica (it does no model work).")


class FinetuneConfig(Strict):
    """The OpenAI fine-tuning API on this deployment: files, jobs, events, checkpoints. Records live
    in the MLflow tracking server (finetune/store.py says why); jobs run as detached Ray actors on
    inference-class nodes, each running the customization pipeline once."""

    enabled: bool = Field(True, description="Serve /v1/files and /v1/fine_tuning/jobs (needs an MLflow tracking URI).")
    tracking_uri: str | None = Field(
        None, description="MLflow server holding files, jobs and the fine-tuned adapters; default registry.tracking_uri, "
        "then $MLFLOW_TRACKING_URI.")
    max_file_bytes: int = Field(50_000_000, ge=1024, description="Largest uploaded file (413 over it).")
    max_file_rows: int = Field(100_000, ge=1, description="Most rows in one uploaded file (413 over it).")
    max_bad_fraction: float = Field(
        0.1, ge=0, le=1, description="Share of rows an upload may have that cannot train (named by line in the "
        "file's status_details; a job skips them); more answer 400 naming the first bad lines.")
    max_active_jobs_per_user: int = Field(
        2, ge=1, description="Jobs one user may have validating, queued or running; more answer 429 with Retry-After.")
    max_job_rows: int = Field(
        20_000, ge=1, description="Most training rows of one job: a job runs in one process on one inference-class "
        "node (one base load; the Ray Data + Ray Train pipeline's start-up would dwarf jobs of this size). Larger "
        "customizations go through `carryon customize` / ray job submit.")
    job_cpus: float = Field(
        1.0, ge=0, description="Logical CPUs a job's process asks for. With replicas.num_cpus, what lets a job run "
        "beside serving: on a 2-CPU laptop, 0.5 per replica + 0.1 gateway + 1 job fit. Where the replicas embed for "
        "jobs (producers: auto) and the cluster runs the trainer service, a job's process only tokenizes, logs and "
        "registers: a fraction (0.1) lets many jobs run at once, at the price that a job which falls back to its "
        "own process (no service reachable) computes over its share.")
    job_gpus: float = Field(0.0, ge=0, description="GPUs a job's process asks for (when its base forward runs there).")
    producers: Literal["auto", "job"] = Field(
        "auto", description="Where a job's base forward runs. 'auto': on this app's model replicas, between their "
        "decode steps (engine.embed_share), else on the cluster's shared producers, else in the job's process; "
        "'job': always in the job's process (a base copy per running job, no job work on the replicas).")
    job_resource_units: float = Field(
        0.01, ge=0, description="Units of replicas.resource per job: jobs run on inference-class nodes.")
    defaults: dict[str, Any] = Field(
        default_factory=lambda: {"carryon": {"kind": "mlp", "width": 64, "gate": True},
                                 "head": {"kind": "inherited"}, "bridge": {"bits": 8},
                                 "alpha": {"init": 0.5, "rule": "scale3"},
                                 "train": {"epochs": 3, "batch_size": 8, "lr": 3.0e-3, "warmup_steps": 10}},
        description="Job YAML sections every job starts from (a request's `carryon` object overrides them; "
        "n_epochs, batch_size and learning_rate_multiplier override train.*). Default: the demo's gated MLP "
        "carry-on on the final state, 3 epochs.")

    @field_validator("defaults")
    @classmethod
    def _defaults(cls, v: dict[str, Any]) -> dict[str, Any]:
        from carryon_ray.config import CarryOnConfig

        bad = sorted(set(v) - {"carryon", "head", "alpha", "bridge", "layers", "train", "data"})
        if bad:
            raise ValueError(f"sections {bad} are decided per job by the service (allowed: carryon, head, alpha, "
                             "bridge, layers, train, data)")
        try:
            CarryOnConfig.model_validate({**v, "data": {**v.get("data", {}), "train": "rows.jsonl"}})
        except ValidationError as exc:
            raise ValueError(validation_message(exc, "finetune.defaults").replace("\n  ", " ")) from None
        return v


class ServeConfig(Strict):
    """Everything `serve.app:build` needs."""

    base: BaseModelConfig = Field(default_factory=BaseModelConfig, description="The shared frozen base.")
    extra_bases: list[BaseModelConfig] = Field(
        default_factory=list, description="Further bases for adapters trained by mixing bases (the job's "
        "extra_bases, same order). Each runs once per decoding step when a batch holds such an adapter."
    )
    base_model_id: str | None = Field(
        None, description="Model id of the bare base in the API (default: base.name's last path part)."
    )
    adapters: list[AdapterEntry] = Field(default_factory=list, description="Adapters listed explicitly.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="MLflow registry discovery.")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API keys.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Request limits.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="The replicas' decode engine.")
    replicas: ReplicaConfig = Field(default_factory=ReplicaConfig, description="Model replicas.")
    gateway: GatewayConfig = Field(default_factory=GatewayConfig, description="HTTP ingress.")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="The fine-tuning API.")

    @model_validator(mode="after")
    def _consistent(self) -> "ServeConfig":
        if self.replicas.min_replicas > self.replicas.max_replicas:
            raise ValueError("replicas.min_replicas must not exceed replicas.max_replicas")
        names = [a.name for a in self.adapters]
        if len(set(names)) != len(names):
            raise ValueError(f"adapters: duplicate names {sorted({n for n in names if names.count(n) > 1})}")
        if self.model_id in names:
            raise ValueError(f"adapters: {self.model_id!r} is the base's model id; rename the adapter")
        return self

    @property
    def finetune_tracking_uri(self) -> str | None:
        import os

        return self.finetune.tracking_uri or self.registry.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")

    @property
    def model_id(self) -> str:
        return self.base_model_id or Path(self.base.name.rstrip("/")).name


def validate_serve_config(data: dict[str, Any] | None, source: str = "serve config") -> ServeConfig:
    try:
        return ServeConfig.model_validate(data or {})
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, source)) from None


def load_serve_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                      extra: dict[str, Any] | None = None) -> ServeConfig:
    """A YAML file (optional), then `extra` fields (Serve args), then dotted overrides."""
    data = read_yaml_mapping(path, "serve config") if path is not None else {}
    data.update(extra or {})
    return validate_serve_config(apply_overrides(data, overrides), str(path or "serve args"))
