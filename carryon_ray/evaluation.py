"""Evaluation: validation loss of base or base + adapter on any dataset, and GSM8K-style exact match.

Exact match follows the paper's protocol: the question rendered with the training prompt template,
greedy decoding for up to N new tokens, and the answer taken as the last number after '####' in the
generated text (integers, decimals, thousands separators, fractions). The reference answer is
extracted from the dataset's answer field the same way. Base and adapter are scored on the same
questions.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
from fractions import Fraction

import torch

from .config import DataConfig
from .data import collate, load_examples, read_rows, DataReport
from .generation import CarryOnModel
from .loss import IGNORE
from .progress import AFTER_S, Progress, lines, quiet

log = logging.getLogger("carryon.eval")

# A number: optional sign, digits with optional thousands separators, optional decimals, or a fraction.
NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?"
_AFTER_MARK = re.compile(r"####\s*(" + NUMBER + ")")


def parse_number(text: str) -> Fraction | None:
    t = text.replace("$", "").replace(",", "").replace(" ", "")
    try:
        if "/" in t:
            num, den = t.split("/")
            return Fraction(int(num), int(den)) if int(den) else None
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(text: str) -> Fraction | None:
    """The last number after '####' (None when the text has no '####' number)."""
    found = _AFTER_MARK.findall(text)
    return parse_number(found[-1]) if found else None


@torch.no_grad()
def validation_loss(model: CarryOnModel, examples, alpha: float | None = None, batch_size: int = 8,
                    progress: Progress = quiet) -> float:
    """Mean next-token cross entropy over target tokens (what training optimises)."""
    total, count = 0.0, 0
    pad = model.tokenizer.pad_token_id
    starts = range(0, len(examples), batch_size)
    for i in progress(starts, "validation loss", len(starts)):
        b = collate(examples[i : i + batch_size], pad)
        logits = model.logits(b["input_ids"], b["attention_mask"], alpha=alpha)[:, :-1]
        y = b["labels"][:, 1:].to(logits.device)
        keep = y != IGNORE
        total += float(torch.nn.functional.cross_entropy(logits[keep].float(), y[keep], reduction="sum"))
        count += int(keep.sum())
    return total / max(count, 1)


def score_answers(rows: list[dict], texts: list[str]) -> dict:
    """Exact match of generated `texts` against the rows' reference answers (both read with
    extract_answer). Any generator can be scored this way, so baselines use the same rule."""
    records, correct, formatted = [], 0, 0
    for r, text in zip(rows, texts, strict=True):
        want, got = extract_answer(str(r["answer"])), extract_answer(text)
        ok = want is not None and got == want
        correct += ok
        formatted += got is not None
        records.append({"question": r["question"], "expected": str(want), "predicted": str(got), "correct": ok})
    n = max(len(rows), 1)
    return {"accuracy": correct / n, "correct": correct, "n": len(rows),
            "answered": formatted / n, "records": records}


def exact_match(model: CarryOnModel, rows: list[dict], template: str, max_new_tokens: int = 256,
                alpha: float | None = None, batch_size: int = 8, progress: Progress = quiet) -> dict:
    """Greedy GSM8K-style accuracy over `rows` ({'question', 'answer'}). 'answered' is the share of
    generations that end with a '#### number' at all (a base that never learned the format scores 0)."""
    tok = model.tokenizer
    texts = []
    starts = range(0, len(rows), batch_size)
    for i in progress(starts, "exact match", len(starts)):
        chunk = rows[i : i + batch_size]
        prompts = [tok(template.format(question=r["question"]), add_special_tokens=False)["input_ids"] for r in chunk]
        outs = model.generate(prompts, max_new_tokens, temperature=0.0, alpha=alpha)
        texts += [tok.decode(out, skip_special_tokens=True) for out in outs]
    return score_answers(rows, texts)


def answer_of(row: dict, template: str) -> tuple[str, str] | None:
    """(prompt, expected answer) of a held-out row: GSM8K {question, answer} (the answer after
    '####'), {prompt, completion}, or chat {messages} ending with the assistant's reply."""
    if "question" in row and "answer" in row:
        return template.format(question=row["question"]), str(row["answer"])
    if "prompt" in row and "completion" in row:
        return str(row["prompt"]), str(row["completion"])
    return None


def is_correct(expected: str, generated: str) -> bool:
    """GSM8K answers compare the number after '####'; other answers compare the first line of the
    generation, stripped, with the expected text, stripped (case-sensitive: the format is part of
    what a customization teaches)."""
    want = extract_answer(expected)
    if want is not None:
        return extract_answer(generated) == want
    return generated.strip().split("\n")[0].strip() == expected.strip()


def heldout_prompts(tok, rows: list[dict], template: str) -> tuple[list[tuple[str, str]], list[list[int]]]:
    """The (prompt, expected) pairs of the held-out rows that have an answer, and the prompts' token ids."""
    pairs = [p for p in (answer_of(r, template) for r in rows) if p is not None]
    return pairs, [tok(p, add_special_tokens=False)["input_ids"] for p, _ in pairs]


def heldout_result(tok, pairs: list[tuple[str, str]], base_out: list[list[int]], adapter_out: list[list[int]]) -> dict:
    """Accuracies and every record from the generated token ids of base and base + adapter, one
    per pair, wherever they were decoded (one process or a serving replica)."""
    n = len(pairs)
    dec = lambda ids: tok.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    records = [{"prompt": p, "expected": e.strip(), "base": dec(b), "adapter": dec(a),
                "base_correct": is_correct(e, dec(b)), "adapter_correct": is_correct(e, dec(a))}
               for (p, e), b, a in zip(pairs, base_out, adapter_out, strict=True)]
    acc = lambda key: sum(r[key] for r in records) / max(n, 1)  # noqa: E731
    return {"rows": n, "base_accuracy": acc("base_correct"), "adapter_accuracy": acc("adapter_correct"),
            "records": records}


def heldout_comparison(bases, adapter, rows: list[dict], template: str, max_new_tokens: int = 16,
                       progress: Progress | None = None) -> dict:
    """Greedy answers of the bare base and of base + adapter on held-out rows, side by side, in one
    decode run (the two are rows of one mixed batch). Returns accuracies and every record.
    `progress` wraps the run's decode steps."""
    from .generation import generate_mixed

    bases = bases if isinstance(bases, list) else [bases]
    tok = bases[0].tokenizer
    pairs, prompts = heldout_prompts(tok, rows, template)
    n = len(prompts)
    outs = generate_mixed(bases, prompts * 2, [None] * n + [adapter] * n, max_new_tokens=max_new_tokens,
                          progress=progress, desc=f"held-out answers of base and adapter on {n} prompts (decode steps)")
    return heldout_result(tok, pairs, outs[:n], outs[n:])


@contextlib.contextmanager
def adapter_files(files: dict[str, bytes]):
    """An adapter that travelled as its files' bytes (safetensors + JSON), written into a
    temporary directory for its loader: file names only (no path a caller chose), nothing executed."""
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            (Path(d) / Path(name).name).write_bytes(data)
        yield d


def job_heldout(cfg) -> tuple[list[dict], str] | None:
    """A run's held-out set, as heldout_prompts takes it: (the rows cfg.eval names, drawn by the
    run's seed; the run's prompt template), or None when it names none. The one reading of cfg.eval
    for both decode paths (one process below, a serving replica in serve/replica.py)."""
    from .data import heldout_rows

    if not cfg.eval.heldout:
        return None
    return heldout_rows(cfg.eval.heldout, cfg.eval.heldout_size, cfg.train.seed), cfg.data.prompt_template


def score_heldout(bases, adapter_dir, cfg) -> dict | None:
    """cfg.eval's held-out comparison for a saved adapter (None when no held-out set is configured)."""
    from .generation import Adapter

    held = job_heldout(cfg)
    if held is None:
        return None
    bases = bases if isinstance(bases, list) else [bases]
    rows, template = held

    def paced(items, desc, total):  # silent for a short run, else lines with an ETA, as training speaks
        return lines(items, desc, total, every_s=cfg.train.progress_s, logger=log, after_s=AFTER_S)

    return heldout_comparison(bases, Adapter.load(bases, adapter_dir), rows, template, cfg.eval.max_new_tokens, paced)


def score_heldout_files(bases, cfg_json: dict, files: dict[str, bytes]) -> dict | None:
    """score_heldout for an adapter that travelled as its files' bytes (safetensors + JSON), on
    bases already loaded wherever this runs (a producer, a task): no filesystem shared with the
    driver, and nothing in `files` is executed."""
    from .config import CarryOnConfig

    with adapter_files(files) as d:
        return score_heldout(bases, d, CarryOnConfig.model_validate(cfg_json))


def side_by_side(result: dict, show: int) -> str:
    """The first `show` held-out answers of base and adapter, one row each, and both accuracies, as text."""
    def cell(text: str, width: int) -> str:
        text = text.replace("\n", " | ")
        return (text if len(text) <= width else text[: width - 1] + "~").ljust(width)

    def mark(ok: bool) -> str:
        return "+" if ok else "-"

    rows = result["records"][:show]
    pw = min(56, max([len("prompt")] + [len(r["prompt"]) for r in rows]))
    lines = [f"  {'prompt'.ljust(pw)}  {'expected'.ljust(10)}  {'base'.ljust(24)}  adapter"] if rows else []
    for r in rows:
        lines.append(f"  {cell(r['prompt'], pw)}  {cell(r['expected'], 10)}  "
                     f"{mark(r['base_correct'])}{cell(repr(r['base']), 23)}  {mark(r['adapter_correct'])}{r['adapter'][:40]!r}")
    lines.append(f"held-out accuracy on {result['rows']} prompts: base {result['base_accuracy']:.0%}, "
                 f"base + adapter {result['adapter_accuracy']:.0%}")
    return "\n".join(lines)


def evaluate_dataset(base, adapter: str | None, data: str, fmt: str = "auto", template: str | None = None,
                     limit: int | None = None, max_new_tokens: int = 256, alpha: float | None = None,
                     gsm8k: bool = False, max_length: int = 512, progress: Progress = quiet) -> dict:
    """Validation loss (and exact match for 'question'/'answer' rows when `gsm8k`) of the bare base
    and, when `adapter` is given, of base + adapter on the same rows."""
    cfg = DataConfig(train=data, format=fmt, max_length=max_length,
                     **({"prompt_template": template} if template else {}))
    bare = CarryOnModel.from_pretrained(base)
    examples, report = load_examples(data, bare.tokenizer, cfg, limit=limit)
    models = {"base": (bare, 0.0)}
    if adapter:
        models["adapter"] = (CarryOnModel.from_pretrained(bare.bases, adapter), alpha)
    rows = read_rows(data, DataReport(data), limit) if gsm8k else []
    rows = [r for r in rows if isinstance(r, dict) and "question" in r and "answer" in r]
    out: dict = {"data": data, "rows_scored": len(examples), "data_report": report.summary()}
    for name, (m, a) in models.items():
        res = {"loss": validation_loss(m, examples, a if m.carryon is not None else None, progress=progress)}
        if m.carryon is not None:
            res["alpha"] = float(m.carryon.alpha if a is None else a)
        if gsm8k:
            em = exact_match(m, rows, cfg.prompt_template, max_new_tokens, a if m.carryon is not None else None,
                             progress=progress)
            res.update({k: em[k] for k in ("accuracy", "correct", "n", "answered")})
            res["samples"] = em["records"][:5]
        out[name] = res
    return out
