"""Shared fixtures: the real SmolLM2 base (converted once into the repo's .cache) and tiny
random-weight Llama bases saved with save_pretrained. Nothing here downloads from a hub."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("CARRYON_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under `make test`'s pytest workers, each worker's torch (and what it starts: CLI runs, job
# drivers, clusters) gets its share of the cores. Two workers at two threads each on two cores
# spin-wait on each other: a 6 s test took 56 s in the first two-worker run.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import torch  # noqa: E402

from carryon_ray.base import FrozenBase, resolve_base_path  # noqa: E402
from carryon_ray.config import BaseModelConfig, CarryOnConfig, validate_config  # noqa: E402


# The slowest files first (bench/results/test-durations.json), so that with `make test`'s two
# workers the two longest (the job tests' cluster and the multinode cluster) start at once on
# different workers and the short files fill in around them. Measured against the alternative
# (the multinode and job files queued on one worker, the short files and SmolLM2 training on the
# other): 1,347 s this way, 1,561 s that way (clean-clone runs, 2026-12-03).
HEAVY_FIRST = ["test_job.py", "test_multinode.py", "test_serve.py", "test_finetune.py", "test_trainers.py", "test_train.py"]


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return HEAVY_FIRST.index(name) if name in HEAVY_FIRST else len(HEAVY_FIRST)

    items.sort(key=rank)  # stable: each file's own order is kept


@pytest.fixture(scope="session")
def smol_dir() -> str:
    """Directory of the converted SmolLM2-135M-Instruct safetensors cache."""
    path, _ = resolve_base_path(BaseModelConfig(name="smollm2-135m-instruct"))
    return path


@pytest.fixture(scope="session")
def smol_fp32(smol_dir) -> FrozenBase:
    return FrozenBase.load(BaseModelConfig(name=smol_dir, dtype="float32"))


@pytest.fixture(scope="session")
def smol_bf16(smol_dir) -> FrozenBase:
    return FrozenBase.load(BaseModelConfig(name=smol_dir, dtype="bfloat16"))


TINY_VOCAB = 1024


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(tokenizer_dir: str):
    """SmolLM2's tokenizer retrained to TINY_VOCAB tokens on the built-in data and the general text.

    It keeps what the code reads from a tokenizer: byte-level BPE (any text encodes), the special
    tokens and their ids, the chat template. With SmolLM2's 49,152-token vocabulary the tiny model's
    output head and its softmax were most of a tiny job's training time (carryon_ray/loss.py's
    chunked cross-entropy: 9.4 of 12.2 s in `carryon train` on configs/tiny-test.yaml). Training is
    deterministic, so every tiny base built from one tokenizer shares it (mixed bases need that)."""
    from transformers import AutoTokenizer

    from carryon_ray.data import arithmetic_problems, topic_rows

    def corpus():
        for r in arithmetic_problems(400):
            yield f"{r['question']} {r['answer']}"
        for split in ("train", "heldout"):
            yield from (r["prompt"] + r["completion"] for r in topic_rows(400, split=split))
        yield (ROOT / "tests/data/general.txt").read_text()

    return AutoTokenizer.from_pretrained(tokenizer_dir).train_new_from_iterator(corpus(), vocab_size=TINY_VOCAB)


def make_tiny_base(out: Path, tokenizer_dir: str, seed: int = 0, hidden: int = 64, layers: int = 2, tied: bool = True,
                   full_vocab: bool = False) -> str:
    """A random-weight Llama with a small-vocabulary SmolLM2 tokenizer (tiny_tokenizer; `full_vocab`:
    SmolLM2's own, for bench/tiny_base.py's comparison), saved with save_pretrained."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir) if full_vocab else tiny_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smol_dir) -> str:
    return make_tiny_base(tmp_path_factory.mktemp("tiny-llama"), smol_dir, seed=0)


@pytest.fixture(scope="session")
def tiny_base(tiny_dir) -> FrozenBase:
    return FrozenBase.load(BaseModelConfig(name=tiny_dir, dtype="float32"))


def make_config(**sections) -> CarryOnConfig:
    data = {"data": {"train": "builtin:arithmetic"}}
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return validate_config(data)
