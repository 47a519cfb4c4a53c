"""Training data: rows from files (or the built-in generator) -> token ids with loss labels.

Row formats (one JSON object per line in .jsonl; plain .txt is text):
  text               {"text": ...}                      loss on every token
  prompt_completion  {"prompt": ..., "completion": ...} loss on completion tokens only
  qa                 {"question": ..., "answer": ...}   GSM8K style; prompt from a template
  chat               {"messages": [{"role", "content"}]} chat template; loss on the last reply

Malformed rows are skipped and counted by reason (`DataReport`); a file that is mostly bad stops
the run with a clear error instead of training on scraps.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .config import DataConfig
from .rows import IGNORE


class DataError(ValueError):
    """The data cannot be used (missing file, mostly malformed rows)."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    key: str = ""  # the row's content hash and the window index: decides split, replay pick, order, id
    segments: list[int] | None = None  # packed examples: the lengths of the examples in this sequence


# ---------------------------------------------------------------------------------------------
# The rules that decide where a row goes, from the row alone: every runner (one process, a Ray
# Data pipeline on any cluster size) puts the same rows in the same split, in the same order.
# ---------------------------------------------------------------------------------------------


def row_key(row: dict | str) -> str:
    """A stable content hash of a raw row (its JSON with sorted keys, or its text)."""
    text = row if isinstance(row, str) else json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


def unit(key: str, salt: str) -> float:
    """A number in [0, 1) drawn from the key: uniform across rows, fixed for a row."""
    return int(hashlib.sha1(f"{salt}|{key}".encode()).hexdigest()[:15], 16) / 16**15


def sample_id(key: str) -> int:
    """A 60-bit id of an example, the same in every runner (audits count ids, not positions)."""
    return int(hashlib.sha1(f"id|{key}".encode()).hexdigest()[:15], 16)


def in_val(key: str, fraction: float) -> bool:
    return unit(key.split("#")[0], "val") < fraction  # whole rows (all their windows) on one side


def order_key(key: str, seed: int) -> float:
    """Training order: a seeded shuffle that does not depend on how the rows were read."""
    return unit(key, f"order:{seed}")


def replay_pick(key: str, seed: int, threshold: float) -> bool:
    return unit(key, f"replay:{seed}") < threshold


@dataclass
class DataReport:
    """Counts of rows read, kept and skipped (by reason) for one source."""

    source: str
    rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    @property
    def bad(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"{self.source}: {self.rows} rows, {self.kept} kept, {self.bad} skipped ({reasons})"

    def metrics(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}_rows": self.rows, f"{prefix}_kept": self.kept, f"{prefix}_skipped": self.bad}
        out.update({f"{prefix}_skipped_{k}": v for k, v in self.skipped.items()})
        return out


# ---------------------------------------------------------------------------------------------
# The built-in dataset: arithmetic word problems with worked solutions (GSM8K answer format).
# ---------------------------------------------------------------------------------------------

_NAMES = ["Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kira", "Liam"]
_ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "shells", "stamps", "coins", "cards"]


def arithmetic_problems(n: int, seed: int = 0) -> list[dict]:
    """`n` generated word problems: {"question", "answer"} with '#### <number>' at the end."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        a, b, c = rng.randint(5, 60), rng.randint(2, 30), rng.randint(2, 9)
        kind = rng.randrange(3)
        if kind == 0:
            s = a + b
            d = rng.randint(1, s - 1)
            q = f"{name} has {a} {item}. {name} gets {b} more and then gives away {d}. How many {item} does {name} have now?"
            steps = [f"{name} starts with {a} {item}.", f"After getting {b} more: {a} + {b} = <<{a}+{b}={s}>>{s}.",
                     f"After giving away {d}: {s} - {d} = <<{s}-{d}={s - d}>>{s - d}."]
            ans = s - d
        elif kind == 1:
            p = b * c
            q = f"{name} buys {c} boxes of {item} with {b} {item} in each box, and already had {a}. How many {item} does {name} have in total?"
            steps = [f"The boxes hold {c} * {b} = <<{c}*{b}={p}>>{p} {item}.",
                     f"With the {a} already there: {p} + {a} = <<{p}+{a}={p + a}>>{p + a}."]
            ans = p + a
        else:
            total = c * b
            q = f"{name} shares {total} {item} equally among {c} friends. How many {item} does each friend get?"
            steps = [f"Each friend gets {total} / {c} = <<{total}/{c}={b}>>{b} {item}."]
            ans = b
        rows.append({"question": q, "answer": " ".join(steps) + f"\n#### {ans}"})
    return rows


# ---------------------------------------------------------------------------------------------
# The demo's built-in task: the topic of a sentence, from a fixed label set.
# ---------------------------------------------------------------------------------------------

TOPICS = {
    "sports": (["The striker", "Our goalkeeper", "The coach", "The home team", "A young sprinter", "The captain",
                "The tennis champion", "The cyclist", "The referee", "The swimmer"],
               ["scored twice in", "trained hard before", "lost the lead during", "celebrated a win after",
                "was injured in", "set a new record in", "was sent off during", "warmed up for"],
               ["the final match", "the league game", "the marathon", "the semifinal", "the relay race",
                "the derby", "the championship round", "the penalty shootout"]),
    "weather": (["A cold front", "Heavy rain", "The storm", "Thick fog", "A heat wave", "Strong wind", "Light snow",
                 "The thunderstorm", "A sudden hailstorm", "Morning frost"],
                ["swept across", "flooded", "covered", "is expected over", "hit", "lingered over", "moved toward",
                 "cleared from"],
                ["the coast", "the northern valleys", "the city center", "the mountain passes", "the harbor",
                 "the southern plains", "the airport", "the river delta"]),
    "food": (["The chef", "My grandmother", "The bakery", "A street vendor", "The restaurant", "Our neighbor",
              "The pastry cook", "The food truck"],
             ["baked", "roasted", "served", "seasoned", "grilled", "simmered", "sliced", "prepared"],
             ["fresh bread with garlic", "a spicy tomato soup", "lemon cake for dessert", "noodles with ginger",
              "a pot of lentil stew", "crispy potatoes with rosemary", "a plate of dumplings", "pancakes with honey"]),
    "music": (["The orchestra", "A jazz trio", "The violinist", "Our choir", "The guitarist", "The drummer",
               "A famous pianist", "The rock band"],
              ["performed", "rehearsed", "recorded", "composed", "played", "released", "sang", "improvised"],
              ["a new symphony", "an old ballad", "the opening song", "a live album", "a slow waltz",
               "the encore", "a folk melody", "a loud anthem"]),
    "technology": (["The startup", "Our engineers", "The new phone", "A software update", "The laptop maker",
                    "The research lab", "The chip designer", "The cloud provider"],
                   ["released", "patched", "tested", "shipped", "upgraded", "announced", "debugged", "launched"],
                   ["a faster processor", "the mobile app", "a security fix", "an open source library",
                    "the battery firmware", "a new data center", "the operating system", "a smarter search engine"]),
}
TOPIC_PROMPT = "Sentence: {sentence}\nTopic:"


def topic_rows(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """`n` generated sentences, each about one of five topics, as prompt/completion rows whose
    completion is the topic's name. `split` is 'train' or 'heldout': a sentence belongs to one split
    by a hash of its text, so the two never share a prompt (whatever n and seed)."""
    import hashlib

    rng = random.Random(f"{seed}:{split}")
    rows, seen = [], set()
    labels = sorted(TOPICS)
    misses = 0  # draws in a row that found no new sentence: the label's sentences are used up
    while len(rows) < n:
        label = labels[len(rows) % len(labels)]
        subjects, verbs, objects = TOPICS[label]
        sentence = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}."
        in_heldout = hashlib.sha256(sentence.encode()).digest()[0] < 64  # about a quarter of all sentences
        if sentence in seen or in_heldout != (split == "heldout"):
            misses += 1
            if misses > 20_000:
                raise DataError(f"builtin:topics has fewer than {n} distinct {split} sentences; "
                                "lower data.builtin_size")
            continue
        misses = 0
        seen.add(sentence)
        rows.append({"prompt": TOPIC_PROMPT.format(sentence=sentence), "completion": " " + label})
    rng.shuffle(rows)
    return rows


BUILTINS = {"builtin:arithmetic": lambda n, seed: arithmetic_problems(n, seed),
            "builtin:topics": lambda n, seed: topic_rows(n, seed, "train"),
            "builtin:topics-heldout": lambda n, seed: topic_rows(n, seed, "heldout")}


# ---------------------------------------------------------------------------------------------
# Reading rows.
# ---------------------------------------------------------------------------------------------


def parse_line(raw: bytes, text_file: bool) -> tuple[dict | None, str | None]:
    """One line of a .jsonl or .txt file: (row, None) or (None, why it is malformed)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "bad_encoding"
    if text_file:
        return {"text": line.rstrip("\r\n")}, None
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None, "bad_json"
    if not isinstance(row, dict):
        return None, "not_an_object"
    return row, None


def read_rows(path: str, report: DataReport, limit: int | None = None) -> list[dict]:
    """Rows of a .jsonl (one object per line) or .txt (one text row per non-empty line) file,
    reading at most `limit` non-empty lines."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {path}")
    rows = []
    with p.open("rb") as fh:
        for raw in fh:
            if not raw.strip():
                continue
            if limit is not None and report.rows >= limit:
                break
            report.rows += 1
            row, reason = parse_line(raw, p.suffix == ".txt")
            if reason:
                report.skipped[reason] += 1
            else:
                rows.append(row)
    return rows


def detect_format(row: dict) -> str | None:
    if "messages" in row:
        return "chat"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "question" in row and "answer" in row:
        return "qa"
    if "text" in row:
        return "text"
    return None


ROLES = ("system", "user", "assistant")


def row_problem(row: dict, fmt: str = "auto") -> str | None:
    """Why a row cannot train, naming the field (`messages[1].role: ...`), or None. The structural
    rules of each row format, checked without a tokenizer: what an uploaded file is validated by
    line by line (length limits need the tokenizer and are counted when the job reads the rows)."""
    fmt = detect_format(row) if fmt == "auto" else fmt
    if fmt is None:
        return "no known fields: give messages, prompt + completion, question + answer, or text"
    if fmt == "chat":
        msgs = row.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return "messages: must be a non-empty list of {role, content} objects"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                return f"messages[{i}]: must be an object with role and content"
            if m.get("role") not in ROLES:
                return f"messages[{i}].role: must be one of {', '.join(ROLES)} (got {str(m.get('role'))[:40]!r})"
            if not isinstance(m.get("content"), str):
                return f"messages[{i}].content: must be a string"
        if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
            return f"messages[{len(msgs) - 1}]: the last message must be a non-empty assistant reply (what is learned)"
        return None
    fields = {"prompt_completion": ("prompt", "completion"), "qa": ("question", "answer"), "text": ("text",)}[fmt]
    for name in fields:
        value = row.get(name)
        if name == "answer" and isinstance(value, (int, float)) and not isinstance(value, bool):
            continue
        if not isinstance(value, str):
            return f"{name}: must be a string" + (" (required)" if value is None else "")
    target = fields[-1]
    if not str(row[target]).strip():
        return f"{target}: is empty (nothing to learn)"
    return None


class Tokenizer:
    """Turns rows into Examples with the loss mask; counts what it rejects."""

    def __init__(self, tokenizer, cfg: DataConfig):
        self.tok, self.cfg = tokenizer, cfg
        self.eos = tokenizer.eos_token_id

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def prompt_completion(self, row: dict, fmt: str) -> tuple[str, str] | None:
        if fmt == "prompt_completion":
            return row["prompt"], row["completion"]
        if fmt == "qa":
            return self.cfg.prompt_template.format(question=row["question"]), " " + str(row["answer"]).strip()
        return None

    def example(self, row: dict, report: DataReport) -> list[Example]:
        """The row's examples; a rejected row is counted in `report` by reason."""
        examples, reason = self.examples(row)
        if reason:
            report.skipped[reason] += 1
        return examples

    def examples(self, row: dict) -> tuple[list[Example], str | None]:
        """(examples, None), or ([], the reason the row is rejected). Each example is keyed by the
        row's content hash and its window index, and has at least one scored target."""
        key = row_key(row)
        fmt = self.cfg.format if self.cfg.format != "auto" else detect_format(row)
        if fmt is None:
            return [], "missing_fields"
        try:
            if fmt == "text":
                text = row["text"]
                if not isinstance(text, str):
                    raise TypeError
                if not text.strip():
                    return [], "empty"
                found = [Example(ids, list(ids)) for ids in self._windows(self._ids(text))]
            else:
                if fmt == "chat":
                    prompt_ids, comp_ids = self._chat(row["messages"])
                else:
                    prompt, completion = self.prompt_completion(row, fmt)
                    if not isinstance(prompt, str) or not isinstance(completion, str):
                        raise TypeError
                    if not completion.strip():
                        return [], "empty"
                    prompt_ids, comp_ids = self._ids(prompt), self._ids(completion) + [self.eos]
                ids = prompt_ids + comp_ids
                if len(ids) > self.cfg.max_length:
                    return [], "too_long"
                labels = list(ids) if self.cfg.loss_on_prompt else [IGNORE] * len(prompt_ids) + comp_ids
                found = [Example(ids, labels)]
        except (KeyError, TypeError, IndexError, AttributeError, ValueError, UnicodeError):
            return [], "missing_fields"
        out = []
        for i, ex in enumerate(found):
            ex.key = f"{key}#{i}"
            mask_first([ex], self.cfg.mask_first_n)
            if any(lab != IGNORE for lab in ex.labels[1:]):
                out.append(ex)
        return (out, None) if out else ([], "no_targets")

    def _chat(self, messages) -> tuple[list[int], list[int]]:
        if not messages or messages[-1]["role"] != "assistant" or not str(messages[-1]["content"]).strip():
            raise ValueError("chat rows must end with a non-empty assistant message")
        full = self.tok.apply_chat_template(messages, tokenize=True, return_dict=False)
        prompt = self.tok.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True, return_dict=False)
        if full[: len(prompt)] != prompt:  # template re-renders history: fall back to lengths
            prompt = full[: len(prompt)]
        return list(prompt), list(full[len(prompt) :])

    def _windows(self, ids: list[int]) -> list[list[int]]:
        # Long plain text is split into max_length windows (continued pretraining), not dropped.
        n = self.cfg.max_length
        return [ids[i : i + n] for i in range(0, len(ids), n) if len(ids[i : i + n]) > 1]


def mask_first(examples: list[Example], n: int) -> None:
    for ex in examples:
        ex.labels[:n] = [IGNORE] * min(n, len(ex.labels))


def source_rows(source: str, cfg: DataConfig, report: DataReport, limit: int | None = None,
                seed: int = 0) -> list[dict]:
    """Raw rows of one source in this process: a built-in (generated) or a .jsonl/.txt file."""
    if source in BUILTINS:
        rows = BUILTINS[source](min(cfg.builtin_size, limit or cfg.builtin_size), seed)
        report.rows = len(rows)
        return rows
    if source.startswith("builtin:"):
        raise DataError(f"unknown built-in dataset {source!r}; available: {', '.join(sorted(BUILTINS))}")
    return read_rows(source, report, limit)


def check_bad_fraction(report: DataReport, cfg: DataConfig, examples: int) -> None:
    """Mostly malformed data stops the run with one clear error instead of training on scraps."""
    if report.rows == 0 or report.bad > cfg.max_bad_fraction * report.rows or not examples:
        raise DataError(
            f"{report.summary()}: too many malformed rows (limit data.max_bad_fraction = "
            f"{cfg.max_bad_fraction}); fix the file or its format"
        )


def stream_windows(examples, eos: int, n: int):
    """Continued pretraining: one stream of documents (each ended by EOS) cut into full windows,
    loss on every token (attention crosses documents, as Hugging Face's group_texts does). A
    generator over any iterable of examples, holding one window at a time (the Ray job streams a
    dataset's rows through it on a worker)."""
    buf: list[int] = []
    for ex in examples:
        buf += list(ex.input_ids) + [eos]
        while len(buf) >= n:
            w, buf = buf[:n], buf[n:]
            yield Example(w, list(w), key=row_key(" ".join(map(str, w))))
    if len(buf) > 1:
        yield Example(buf, list(buf), key=row_key(" ".join(map(str, buf))))


def tokenizing_config(cfg: DataConfig) -> DataConfig:
    """The data config rows are tokenized with: stream packing cuts the joined stream itself, so each
    row stays whole until then (no max_length windows)."""
    return cfg.model_copy(update={"max_length": 1 << 30}) if cfg.pack else cfg


def pack_examples(examples: list[Example], max_length: int) -> list[Example]:
    """Several short examples per sequence, in order, each sequence at most max_length tokens.
    Attention stays inside each example (the `segments` tell the base and the carry-on where they
    end), positions restart at each one, and the first token of every example is not a target, so
    each example's loss is the same as unpacked."""
    return [e for e, _ in pack_in_order(((e, False) for e in examples), max_length)]


def _packed(group: list[Example]) -> Example:
    labels: list[int] = []
    for e in group:
        labels += [IGNORE] + list(e.labels[1:])
    return Example([t for e in group for t in e.input_ids], labels, key=row_key("|".join(e.key for e in group)),
                   segments=[len(e.input_ids) for e in group])


def pack_in_order(tagged, max_length: int):
    """`pack_examples` over (example, replay) pairs in training order, as a generator: customization
    and replay examples fill separate sequences (a sequence is all one or the other); a sequence is
    emitted, with its flag, as soon as the next example of its kind would not fit, and the open
    ones at the end. One pass, two open sequences in memory: the Ray job streams through it."""
    open_: dict[bool, list[Example]] = {False: [], True: []}
    size = {False: 0, True: 0}
    for ex, replay in tagged:
        replay = bool(replay)
        if open_[replay] and size[replay] + len(ex.input_ids) > max_length:
            yield _packed(open_[replay]), replay
            open_[replay], size[replay] = [], 0
        open_[replay].append(ex)
        size[replay] += len(ex.input_ids)
    for replay in (False, True):
        if open_[replay]:
            yield _packed(open_[replay]), replay


def padded_tokens(lengths: list[int], batch_size: int) -> int:
    """Tokens fed when `lengths` are batched in order, each batch padded to its longest."""
    return sum(max(lengths[i : i + batch_size]) * len(lengths[i : i + batch_size])
               for i in range(0, len(lengths), batch_size))


def padding_share(lengths: list[int], batch_size: int) -> float:
    """The share of padding tokens when `lengths` are batched in order, padded to each batch's longest."""
    return 1 - sum(lengths) / max(padded_tokens(lengths, batch_size), 1)


def load_examples(source: str, tokenizer, cfg: DataConfig, limit: int | None = None, seed: int = 0):
    """(examples, report) for one source: a path or a built-in dataset (BUILTINS)."""
    report = DataReport(source)
    rows = source_rows(source, cfg, report, limit, seed)
    tok = Tokenizer(tokenizer, tokenizing_config(cfg))
    examples = []
    for row in rows:
        exs = tok.example(row, report)
        report.kept += bool(exs)
        examples += exs
    if cfg.pack:
        examples = list(RowPlan(cfg, seed).windows(examples, tok.eos))
    check_bad_fraction(report, cfg, len(examples))
    return examples, report


@dataclass(frozen=True)
class Source:
    """One data source of a run: its role, where it is read from, the data config it is tokenized
    with, the seed of a built-in generator and a row limit."""

    role: str  # train, val (a separate file), general, replay
    source: str
    cfg: DataConfig
    seed: int
    limit: int | None = None


@dataclass(frozen=True)
class RowPlan:
    """Where every row of a run goes, decided from the row alone. Both backends (a list in this
    process, a Ray Data pipeline on a cluster) apply exactly these rules, so the same rows land in
    the same split, replay pick and training order, packed the same way, on every cluster size."""

    data: DataConfig
    seed: int

    def sources(self) -> list[Source]:
        """The run's sources. General-domain sets score every token of whatever rows they hold (plain
        text, or a built-in / jsonl of another task read whole, each row on its own: never packed);
        so do replay rows."""
        d, seed = self.data, self.seed
        whole = {"format": "auto", "loss_on_prompt": True, "pack": False, "pack_examples": False}
        out = [Source("train", d.train, d, seed, d.num_samples)]
        if d.val:
            out.append(Source("val", d.val, d, seed + 1))
        if d.general_val:
            out.append(Source("general", d.general_val, d.model_copy(update={**whole, "builtin_size": d.general_rows}),
                              seed, d.general_rows))
        if d.replay:
            out.append(Source("replay", d.replay, d.model_copy(update=whole), seed + 2))
        return out

    def in_val(self, key: str) -> bool:
        """Validation rows when data.val is not set: a hash of the whole row (all its windows)."""
        return in_val(key, self.data.val_fraction)

    @staticmethod
    def val_fallback(keys) -> str:
        """A set too small for any row to hash into validation: the row the hash ranks first."""
        return min(keys, key=lambda k: unit(k.split("#")[0], "val"))

    def replay_threshold(self, n_custom: int, n_pool: int) -> float:
        return self.data.replay_ratio * n_custom / max(n_pool, 1)

    def replay_pick(self, key: str, threshold: float) -> bool:
        return replay_pick(key, self.seed, threshold)

    def order(self, key: str) -> float:
        return order_key(key, self.seed)

    def windows(self, examples, eos: int):
        """data.pack: one stream of documents cut into max_length windows (`stream_windows`)."""
        return stream_windows(examples, eos, self.data.max_length)

    def packed(self, tagged):
        """data.pack_examples over (example, replay) pairs in training order (`pack_in_order`); the
        pairs unchanged when it is off. A generator: the Ray job streams a dataset through it."""
        if not self.data.pack_examples:
            return iter(tagged)
        return pack_in_order(tagged, self.data.max_length)


@dataclass
class Splits:
    train: list[Example]
    val: list[Example]
    general: list[Example] | None
    reports: dict[str, DataReport]  # by role: train, val (a separate file), general, replay
    replay: list[Example] | None = None  # general-domain rows mixed into training (KL to the base)


def load_splits(tokenizer, cfg: DataConfig, seed: int = 0) -> Splits:
    """Train/validation, the optional general-domain set and replay rows, in this process, by the
    run's RowPlan (the Ray job's pipeline, jobs/data.py, applies the same plan)."""
    plan = RowPlan(cfg, seed)
    loaded, reports = {}, {}
    for src in plan.sources():
        loaded[src.role], reports[src.role] = load_examples(src.source, tokenizer, src.cfg, src.limit, src.seed)
    train = loaded["train"]
    if "val" in loaded:
        val = loaded["val"]
    else:
        val = [e for e in train if plan.in_val(e.key)]
        if not val:
            first = plan.val_fallback(e.key for e in train)
            val = [e for e in train if e.key == first]
        picked = {e.key for e in val}
        train = [e for e in train if e.key not in picked]
    replay = None
    if "replay" in loaded:
        threshold = plan.replay_threshold(len(train), len(loaded["replay"]))
        replay = [e for e in loaded["replay"] if plan.replay_pick(e.key, threshold)]
    by_order = lambda exs: sorted(exs, key=lambda e: plan.order(e.key)) if exs else exs  # noqa: E731
    return Splits(by_order(train), by_order(val), loaded.get("general"), reports, by_order(replay))


def collate(examples: list[Example], pad_id: int) -> dict:
    """Right-pad a list of examples into input_ids / attention_mask / labels tensors."""
    import torch  # here, not at the top: Ray Data's tasks import this module and need no torch

    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(examples: list[Example], batch_size: int, pad_id: int, shuffle_seed: int | None = None):
    """Fixed-size padded batches, in a seeded shuffled order (file order when no seed)."""
    order = list(range(len(examples)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        yield collate([examples[j] for j in order[i : i + batch_size]], pad_id)


def heldout_rows(source: str, size: int, seed: int = 0) -> list[dict]:
    """The raw rows of a held-out set: `size` generated rows of a built-in, or the first `size`
    objects of a .jsonl file (malformed lines skipped)."""
    if source in BUILTINS:
        return BUILTINS[source](size, seed)
    if source.startswith("builtin:"):
        raise DataError(f"unknown built-in dataset {source!r}; available: {', '.join(sorted(BUILTINS))}")
    return read_rows(source, DataReport(source), size)
