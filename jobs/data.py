"""Data at cluster scale: Ray Data reads, tokenizes, splits and orders the rows; the driver holds
datasets (plans and object references), counts and reports, never the rows.

    read       a path, a directory, a glob or a URI pyarrow understands (s3://, gs://, abfs://,
               file://), in .jsonl, .parquet or .txt, or a Hugging Face `save_to_disk` directory,
               or a built-in (generated on a worker). Files are split into lines on the workers.
    tokenize   a CPU actor pool runs the core's Tokenizer on every row; malformed rows become
               status rows, counted by reason on the workers (the "mostly bad data stops the run"
               rule is checked on those counts).
    split      by the run's RowPlan (carryon_ray/data.py), the rules `carryon train` applies: a hash
               of each row decides validation and the replay pick, the same rows on every run and
               every cluster size.
    order      sorted by the plan's order key (a seeded shuffle fixed per row); data.pack and
               data.pack_examples stream the rows, in order, through the plan's generators in one
               task (_through_core).

The datasets are materialized in the object store (spilled to disk by Ray when they outgrow it):
token ids are ~4 bytes a token, small next to the bridge codes they become.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np

from carryon_ray.config import CarryOnConfig, DataConfig
from carryon_ray.data import (BUILTINS, DataError, DataReport, RowPlan, Tokenizer, padded_tokens, parse_line,
                              sample_id, tokenizing_config)
from carryon_ray.rows import ROW_ID, ROW_INPUT_IDS, ROW_LABELS, ROW_REPLAY, ROW_SEGMENTS

log = logging.getLogger("carryon.job")

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".txt": "text", ".parquet": "parquet", ".arrow": "arrow"}
PROFILE_ROWS = 1000  # rows of a dataset's token profile logged to MLflow (a description, not the data)


# ---------------------------------------------------------------------------------------------
# Reading: raw rows as {"raw": JSON text or None, "reason": why the line is malformed or ""}.
# ---------------------------------------------------------------------------------------------


def resolve_files(source: str) -> dict[str, list[str]]:
    """format -> files of a path, directory, glob or URI (listing only: no file is read here). A
    directory holding a Hugging Face `save_to_disk` dataset (state.json) yields its .arrow files."""
    import pyarrow.fs as pafs

    has_glob = any(c in source for c in "*?[")
    base = source.split("*")[0].rsplit("/", 1)[0] if has_glob else source
    try:
        fs, root = pafs.FileSystem.from_uri(base)
        scheme = base.split("://", 1)[0] + "://" if "://" in base else ""
    except (ValueError, TypeError):
        fs, root, scheme = pafs.LocalFileSystem(), base, ""
    if has_glob:
        pattern = source.split("://", 1)[1] if "://" in source else source
        infos = [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                 if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, pattern.lstrip("/") if not
                                                                     pattern.startswith("/") else pattern)]
    else:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"data file not found: {source}")
        if info.type == pafs.FileType.File:
            infos = [info]
        else:
            infos = [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                     if i.type == pafs.FileType.File]
    files: dict[str, list[str]] = {}
    names = {PurePosixPath(i.path).name for i in infos}
    if "state.json" in names and any(n.endswith(".arrow") for n in names):  # a save_to_disk directory
        infos = [i for i in infos if i.path.endswith(".arrow")]
    for i in sorted(infos, key=lambda i: i.path):
        fmt = FORMATS.get(PurePosixPath(i.path).suffix.lower())
        if fmt:
            files.setdefault(fmt, []).append(scheme + i.path if scheme else i.path)
    if not files:
        raise DataError(f"data source {source!r} holds no .jsonl, .txt, .parquet or .arrow (save_to_disk) files")
    return files


def _lines(batch: dict) -> dict:
    """Whole files (bytes) -> one raw row per non-empty line, malformed lines marked."""
    raws, reasons = [], []
    for data, path in zip(batch["bytes"], batch["path"]):
        text_file = str(path).endswith(".txt")
        for line in bytes(data).split(b"\n"):
            if not line.strip():
                continue
            row, reason = parse_line(line, text_file)
            raws.append(json.dumps(row, ensure_ascii=False) if row is not None else None)
            reasons.append(reason or "")
    return columns({"raw": raws, "reason": reasons}, ("raw", "reason"))


def _arrow_rows(batch: dict) -> dict:
    """Hugging Face save_to_disk shards (Arrow IPC streams) -> raw rows."""
    import pyarrow as pa

    raws = []
    for data in batch["bytes"]:
        table = pa.ipc.open_stream(pa.BufferReader(bytes(data))).read_all()
        raws += [json.dumps(r, ensure_ascii=False, default=str) for r in table.to_pylist()]
    return columns({"raw": raws, "reason": [""] * len(raws)}, ("raw", "reason"))


def _table_rows(batch) -> dict:
    """Parquet rows (columns) -> raw rows."""
    rows = batch.to_pylist() if hasattr(batch, "to_pylist") else [dict(zip(batch, v)) for v in zip(*batch.values())]
    raws = [json.dumps(r, ensure_ascii=False, default=str) for r in rows]
    return columns({"raw": raws, "reason": [""] * len(raws)}, ("raw", "reason"))


def read_source(source: str, cfg: DataConfig, seed: int, limit: int | None = None) -> tuple[object, int]:
    """(the raw rows of one source as a lazy Ray Dataset, the least number of blocks it reads as):
    nothing is read on the driver. A built-in is one block; files are at least one block each."""
    import ray.data

    if source in BUILTINS:  # generated on a worker, not here
        n = min(cfg.builtin_size, limit or cfg.builtin_size)
        ds = ray.data.range(1).flat_map(lambda _: [{"raw": json.dumps(r), "reason": ""}
                                                   for r in BUILTINS[source](n, seed)])
        return ds, 1
    if source.startswith("builtin:"):
        raise DataError(f"unknown built-in dataset {source!r}; available: {', '.join(sorted(BUILTINS))}")
    parts, blocks = [], 0
    for fmt, files in resolve_files(source).items():
        blocks += len(files)
        if fmt in ("jsonl", "text"):
            parts.append(ray.data.read_binary_files(files, include_paths=True).map_batches(_lines, batch_format="numpy"))
        elif fmt == "arrow":
            parts.append(ray.data.read_binary_files(files).map_batches(_arrow_rows, batch_format="numpy"))
        else:
            parts.append(ray.data.read_parquet(files).map_batches(_table_rows, batch_format="pyarrow"))
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return (ds.limit(limit) if limit else ds), blocks


def columns(out: dict[str, list], objects: tuple[str, ...]) -> dict[str, np.ndarray]:
    """A numpy batch from lists: the `objects` columns as 1-D object arrays (element by element, so
    equal-length lists never become a 2-D array and every block keeps one Arrow type)."""
    batch = {}
    for k, v in out.items():
        if k in objects:
            arr = np.empty(len(v), dtype=object)
            for i, x in enumerate(v):
                arr[i] = x
            batch[k] = arr
        else:
            batch[k] = np.asarray(v)
    return batch


# ---------------------------------------------------------------------------------------------
# Tokenizing on workers.
# ---------------------------------------------------------------------------------------------


class TokenizeRows:
    """Ray Data callable: raw rows -> token rows (ROW_* columns plus the example key) and one status
    row per rejected source row. `rows` counts source rows (1 on a row's first example or on its
    status row, 0 on further windows), so rows read = kept + skipped."""

    def __init__(self, base: dict, data: dict):
        from transformers import AutoTokenizer

        from carryon_ray.base import resolve_base_path
        from carryon_ray.config import BaseModelConfig

        path, gguf = resolve_base_path(BaseModelConfig(**base))
        tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self.tok = Tokenizer(tok, tokenizing_config(DataConfig(**data)))

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {k: [] for k in ("key", ROW_ID, ROW_INPUT_IDS, ROW_LABELS, "reason", "rows", "length")}

        def emit(key, ids, labels, reason, rows):
            out["key"].append(key)
            out[ROW_ID].append(sample_id(key) if key else 0)
            out[ROW_INPUT_IDS].append([int(t) for t in ids])  # lists: one Arrow type whatever the lengths
            out[ROW_LABELS].append([int(t) for t in labels])
            out["reason"].append(reason)
            out["rows"].append(rows)
            out["length"].append(len(ids))

        for raw, reason in zip(batch["raw"], batch["reason"]):
            if reason:
                emit("", [], [], reason, 1)
                continue
            examples, why = self.tok.examples(json.loads(raw))
            if why:
                emit("", [], [], why, 1)
            for i, e in enumerate(examples):
                emit(e.key, e.input_ids, e.labels, "", int(i == 0))
        return columns(out, (ROW_INPUT_IDS, ROW_LABELS, "key", "reason"))


@dataclass
class Ingested:
    """What the driver holds after ingestion: datasets (plans and object references), counts,
    reports. Its size does not grow with the data."""

    train: object  # ray.data.Dataset of token rows in training order (customization + replay)
    val: object
    general: object | None
    n_train: int
    n_custom: int
    n_replay: int
    n_val: int
    train_tokens: int
    reports: dict[str, DataReport] = field(default_factory=dict)
    profiles: dict[str, tuple[str, list[dict], str]] = field(default_factory=dict)
    padding: tuple[float, float] = (0.0, 0.0)  # padding share of the training batches (as trained, unpacked)


def _reason_counts(batch: dict) -> dict:
    """Source rows per status reason in one batch ("" = kept): summed on the driver, one small
    record per reason and batch."""
    counts: dict[str, int] = {}
    for reason, rows in zip(batch["reason"], batch["rows"]):
        counts[str(reason)] = counts.get(str(reason), 0) + int(rows)
    return columns({"reason": list(counts), "rows": list(counts.values())}, ("reason",))


_TOKENIZERS: dict[str, TokenizeRows] = {}  # per worker process: one tokenizer per (base, data) config


def tokenize_batch(batch: dict, base: dict, data: dict) -> dict:
    """Ray Data task: TokenizeRows on one batch, its tokenizer built once per worker process.

    Tasks, not an actor pool: an actor pool's constructor arguments travel through the object store,
    and Ray's core logs an error line for every such actor with restarts ("has constructor arguments
    in the object store and max_restarts > 0") that a user reads as a failure; a tokenizer is cheap
    to build once per worker process, which Ray reuses across tasks."""
    key = json.dumps([base, data], sort_keys=True, default=str)
    tok = _TOKENIZERS.get(key)
    if tok is None:
        tok = _TOKENIZERS[key] = TokenizeRows(base, data)
    return tok(batch)


def _tokenized(source: str, cfg: CarryOnConfig, data: DataConfig, role: str, seed: int, limit: int | None = None):
    """(materialized token dataset of good rows, DataReport) for one source."""
    from ray.data import TaskPoolStrategy
    from ray.data.expressions import col

    r = cfg.resources
    raw, blocks = read_source(source, data, seed, limit)
    # No more concurrent tasks than input blocks: a cap above them only earns a Ray Data warning.
    ds = raw.map_batches(
        tokenize_batch, fn_kwargs={"base": cfg.base.model_dump(mode="json"), "data": data.model_dump(mode="json")},
        batch_size=256, batch_format="numpy", compute=TaskPoolStrategy(size=max(1, min(r.tokenize_actors, blocks))),
        num_cpus=r.tokenize_cpus,
    ).materialize()
    counts: dict[str, int] = {}
    for part in ds.map_batches(_reason_counts, batch_format="numpy", batch_size=4096).take_all():
        counts[str(part["reason"])] = counts.get(str(part["reason"]), 0) + int(part["rows"])
    report = DataReport(source)
    report.rows = sum(counts.values())
    report.kept = counts.get("", 0)
    for reason, n in counts.items():
        if reason and n:
            report.skipped[reason] += n
    good = ds.filter(expr=col("reason") == "")
    if data.pack:  # continued pretraining: the documents, in order, as one stream cut into windows
        good = _through_core(good, cfg, "windows", data)
    n = good.count()
    from carryon_ray.data import check_bad_fraction

    check_bad_fraction(report, data, n)
    log.debug("data (%s) %s: %d examples", role, report.summary(), n)  # the run reports it (report_data)
    return good.materialize(), report


def _where(ds, keep):
    """The rows whose example key passes `keep` (a Python rule on the key, applied a batch at a time)."""
    def select(batch: dict) -> dict:
        mask = np.array([bool(keep(str(k))) for k in batch["key"]], dtype=bool)
        return {name: col[mask] for name, col in batch.items()}

    return ds.map_batches(select, batch_format="numpy")


# The columns a core rule's output rows carry: the token rows of `_tokenized` (windows of data.pack,
# before the split) or the ordered training rows (sequences of data.pack_examples).
_RULE_COLUMNS = {"windows": ("key", ROW_ID, ROW_INPUT_IDS, ROW_LABELS, "reason", "rows", "length"),
                 "packed": ("key", ROW_ID, ROW_INPUT_IDS, ROW_LABELS, ROW_REPLAY, ROW_SEGMENTS, "order", "length")}


def _rule_rows(ds, cfg_json: dict, rule: str, data_json: dict):
    """A Ray generator task: the rows of `ds`, in order, through one of the RowPlan's streaming rules
    (`windows` for data.pack, `packed` for data.pack_examples: the code `carryon train` runs),
    yielded as Arrow blocks; one sequence in memory at a time."""
    import pyarrow as pa
    from transformers import AutoTokenizer

    from carryon_ray.base import resolve_base_path
    from carryon_ray.data import Example, RowPlan

    cfg = CarryOnConfig.model_validate(cfg_json)
    plan = RowPlan(DataConfig(**data_json), cfg.train.seed)

    def tagged():
        for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
            flags = batch[ROW_REPLAY] if ROW_REPLAY in batch else [False] * len(batch["key"])
            for ids, labels, key, replay in zip(batch[ROW_INPUT_IDS], batch[ROW_LABELS], batch["key"], flags):
                yield Example(list(map(int, ids)), list(map(int, labels)), str(key)), bool(replay)

    if rule == "windows":
        path, gguf = resolve_base_path(cfg.base)
        eos = AutoTokenizer.from_pretrained(path, gguf_file=gguf).eos_token_id
        out_rows = ((w, False) for w in plan.windows((e for e, _ in tagged()), eos))
    else:
        out_rows = plan.packed(tagged())
    names = _RULE_COLUMNS[rule]
    out: dict[str, list] = {k: [] for k in names}
    for e, replay in out_rows:
        row = {"key": e.key, ROW_ID: sample_id(e.key), ROW_INPUT_IDS: e.input_ids, ROW_LABELS: e.labels,
               "reason": "", "rows": 0, "length": len(e.input_ids), ROW_REPLAY: replay,
               ROW_SEGMENTS: list(e.segments or []), "order": 0.0}
        for k in names:
            out[k].append(row[k])
        if len(out["key"]) == 1024:
            yield pa.table(out)
            out = {k: [] for k in names}
    if out["key"]:
        yield pa.table(out)


def _through_core(ds, cfg: CarryOnConfig, rule: str, data: DataConfig):
    """A RowPlan streaming rule applied to `ds` on a worker; the driver holds only block refs."""
    import ray
    import ray.data

    task = ray.remote(num_returns="streaming", num_cpus=cfg.resources.tokenize_cpus)(_rule_rows)
    refs = list(task.remote(ds, cfg.model_dump(mode="json"), rule, data.model_dump(mode="json")))
    return ray.data.from_arrow_refs(refs).materialize() if refs else ds.limit(0)


def _ordered(ds, plan: RowPlan, replay: bool):
    """Tag with the replay flag and the order key (RowPlan.order)."""

    def tag(batch: dict) -> dict:
        batch[ROW_REPLAY] = np.full(len(batch["key"]), replay)
        batch["order"] = np.array([plan.order(k) for k in batch["key"]], dtype=np.float64)
        return batch

    return ds.map_batches(tag, batch_format="numpy")


def _sums(ds, fn, batch_size: int | None = 4096) -> dict[str, int]:
    """Column sums of fn(batch) over the dataset: one small record per batch comes to the driver
    (Ray's own aggregates shuffle through hundreds of partitions: seconds for a few numbers)."""
    total: dict[str, int] = {}
    for part in ds.map_batches(fn, batch_size=batch_size, batch_format="numpy").take_all():
        for k, v in part.items():
            total[k] = total.get(k, 0) + int(v)
    return total


def _padding(ds, batch_size: int) -> tuple[float, int]:
    """(padding share of `ds`'s rows batched in order, their tokens). Each worker sums over 512
    training batches at a time, so one record per 512 batches reaches the driver."""
    def stats(batch: dict) -> dict:
        lengths = [int(n) for n in batch["length"]]
        return {"real": [sum(lengths)], "padded": [padded_tokens(lengths, batch_size)]}

    s = _sums(ds, stats, batch_size * 512)
    return 1 - s.get("real", 0) / max(s.get("padded", 0), 1), s.get("real", 0)


# Ray Data's distributed sort runs three rounds of tasks (sample, map, reduce): about 6 s on a
# 2-core machine whatever the size, most of a small job's data stage. Below this size one task
# sorts the whole dataset as one block instead (the same order: the keys are distinct).
SORT_IN_ONE_TASK_BYTES = 256 * 1024**2


def _sort_block(table):
    return table.sort_by("order")


def _in_order(ds):
    """`ds` materialized in the order of its `order` column."""
    ds = ds.materialize()
    if (ds.size_bytes() or 0) > SORT_IN_ONE_TASK_BYTES:
        return ds.sort("order").materialize()
    return ds.repartition(1).map_batches(_sort_block, batch_size=None, batch_format="pyarrow").materialize()


def _profile(ds) -> list[dict]:
    from carryon_ray.rows import IGNORE

    return [{"tokens": int(r["length"]), "scored_tokens": int(sum(1 for x in r[ROW_LABELS] if x != IGNORE))}
            for r in ds.take(PROFILE_ROWS)]


def ingest(cfg: CarryOnConfig) -> Ingested:
    """Read, tokenize, split, order (and pack) the run's data with Ray Data, by the run's RowPlan."""
    d = cfg.data
    plan = RowPlan(d, cfg.train.seed)
    loaded, reports, profiles = {}, {}, {}
    for src in plan.sources():
        loaded[src.role], reports[src.role] = _tokenized(src.source, cfg, src.cfg, src.role, src.seed, src.limit)
    train = loaded["train"]
    if "val" in loaded:
        val = loaded["val"]
    else:
        val = _where(train, plan.in_val).materialize()
        if val.count() == 0:
            first = plan.val_fallback(r["key"] for r in train.select_columns(["key"]).take_all())
            val = _where(train, lambda k: k == first).materialize()
        train = _where(train, lambda k: not plan.in_val(k)).materialize()
    n_custom = train.count()
    general = loaded.get("general")
    parts = [_ordered(train, plan, False)]
    n_replay = 0
    if "replay" in loaded:
        pool = loaded["replay"]
        threshold = plan.replay_threshold(n_custom, pool.count())
        replay = _where(pool, lambda k: plan.replay_pick(k, threshold)).materialize()
        n_replay = replay.count()
        profiles["replay"] = (str(d.replay), _profile(replay), "training")
        parts.append(_ordered(replay, plan, True))
    ordered = _in_order(parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0])
    unpacked, tokens = _padding(ordered, cfg.train.batch_size)
    if d.pack_examples:  # one streaming pass in training order, by the core's rule
        ordered = _through_core(ordered, cfg, "packed", d)
    columns = [ROW_ID, ROW_REPLAY, ROW_INPUT_IDS, ROW_LABELS, "key", "length"] + ([ROW_SEGMENTS] if d.pack_examples
                                                                                   else [])
    per_block, actors = cfg.resources.embed_batch_size, cfg.resources.embed_actors_max
    ordered = _blocks(ordered.select_columns(columns), per_block, actors)
    row_columns = [ROW_ID, ROW_REPLAY, ROW_INPUT_IDS, ROW_LABELS, "key", "length"]
    val = _blocks(_in_order(_ordered(val, plan, False)).select_columns(row_columns), per_block, actors)
    if general is not None:
        general = _blocks(_ordered(general, plan, False).select_columns(row_columns), per_block, actors)
    profiles["train"] = (str(d.train), _profile(train), "training")
    profiles["val"] = (str(d.val or f"{d.train} (validation split)"), _profile(val), "validation")
    if general is not None:
        profiles["general"] = (str(d.general_val), _profile(general), "evaluation")
    now = unpacked
    if d.pack_examples:  # packing made new sequences: measure them again
        now, tokens = _padding(ordered, cfg.train.batch_size)
    return Ingested(ordered, val, general, ordered.count(), n_custom, n_replay, val.count(), tokens, reports,
                    profiles, (now, unpacked))


# Ray keeps a task's return value under 100 KiB in its owner's heap (here: the driver's), so blocks
# stay above that where the data allows; a smaller dataset still gets 8 blocks per embedding actor,
# and the driver then holds at most 8 x actors x 100 KiB. The measurements behind these numbers:
# docs/design.md, "Data at cluster scale".
MIN_BLOCK_BYTES = 256 * 1024


def _blocks(ds, batch_rows: int, actors: int):
    """Materialize `ds` in blocks of several embedding batches each (at most 64 blocks, each at
    least MIN_BLOCK_BYTES, at least 8 per actor: a pool hands an actor several blocks at once),
    order kept, so the embedding pool's actors share the work from the start. Before any
    embedding actor exists: a repartition task queued behind actors and a trainer holding every
    CPU of a small cluster would never run."""
    ds = ds.materialize()
    n = min(64, ds.count() // batch_rows, max(8 * actors, (ds.size_bytes() or 0) // MIN_BLOCK_BYTES))
    return ds.repartition(n).materialize() if n > 1 else ds


def calibration_rows(ds, n: int) -> list[dict]:
    """The first `n` training rows (the calibration batch: the same rows `carryon train` uses)."""
    return [{ROW_ID: int(r[ROW_ID]), ROW_REPLAY: bool(r[ROW_REPLAY]), ROW_INPUT_IDS: list(map(int, r[ROW_INPUT_IDS])),
             ROW_LABELS: list(map(int, r[ROW_LABELS])), ROW_SEGMENTS: list(map(int, r.get(ROW_SEGMENTS, [])))}
            for r in ds.take(n)]
