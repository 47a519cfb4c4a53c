"""Data at cluster scale: Ray Data reads, tokenizes, splits and orders the rows; the driver holds
datasets (plans and object references), counts and reports, never the rows.

    read       a path, a directory, a glob or a URI pyarrow understands (s3://, gs://, abfs://,
               file://), in .jsonl, .parquet or .txt, or a Hugging Face `save_to_disk` directory,
               or a built-in (generated on a worker). Files are split into lines on the workers.
    tokenize   a CPU actor pool runs the core's Tokenizer on every row; malformed rows become
               status rows, counted by reason on the workers (the "mostly bad data stops the run"
               rule is checked on those counts).
    split      by a hash of each row (carryon_ray.data.in_val), replay picked by a hash: the same
               rows on every run and every cluster size, and the same as `carryon train`.
    order      sorted by the row's order key (a seeded shuffle fixed per row); packed when
               data.pack_examples is set.

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
from carryon_ray.data import (BUILTINS, DataError, DataReport, Tokenizer, in_val, order_key, pack_examples,
                              tokenizing_config,
                              padded_tokens, parse_line, replay_pick, sample_id, unit)
from carryon_ray.embedding import ROW_ID, ROW_INPUT_IDS, ROW_LABELS, ROW_REPLAY, ROW_SEGMENTS

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


def read_source(source: str, cfg: DataConfig, seed: int, limit: int | None = None):
    """The raw rows of one source as a lazy Ray Dataset (nothing is read on the driver)."""
    import ray.data

    if source in BUILTINS:  # generated on a worker, not here
        n = min(cfg.builtin_size, limit or cfg.builtin_size)
        ds = ray.data.range(1).flat_map(lambda _: [{"raw": json.dumps(r), "reason": ""}
                                                   for r in BUILTINS[source](n, seed)])
        return ds
    if source.startswith("builtin:"):
        raise DataError(f"unknown built-in dataset {source!r}; available: {', '.join(sorted(BUILTINS))}")
    parts = []
    for fmt, files in resolve_files(source).items():
        if fmt in ("jsonl", "text"):
            parts.append(ray.data.read_binary_files(files, include_paths=True).map_batches(_lines, batch_format="numpy"))
        elif fmt == "arrow":
            parts.append(ray.data.read_binary_files(files).map_batches(_arrow_rows, batch_format="numpy"))
        else:
            parts.append(ray.data.read_parquet(files).map_batches(_table_rows, batch_format="pyarrow"))
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return ds.limit(limit) if limit else ds


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


def _tokenized(source: str, cfg: CarryOnConfig, data: DataConfig, role: str, seed: int, limit: int | None = None):
    """(materialized token dataset of good rows, DataReport) for one source."""
    r = cfg.resources
    ds = read_source(source, data, seed, limit).map_batches(
        TokenizeRows, fn_constructor_args=(cfg.base.model_dump(), data.model_dump()), batch_size=256,
        batch_format="numpy", compute=ray_pool(1, r.tokenize_actors), num_cpus=r.tokenize_cpus,
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
    good = ds.filter(expr="reason == ''")
    if data.pack:  # continued pretraining: the documents, in order, as one stream cut into windows
        good = _packed_stream(good, cfg, data)
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


def _pack_windows(ds, base: dict, max_length: int):
    """A Ray generator task: the rows of `ds` in order through the core's `stream_windows` (the rule
    `carryon train` packs with), yielded as blocks of windows; one window in memory at a time."""
    import pyarrow as pa
    from transformers import AutoTokenizer

    from carryon_ray.base import resolve_base_path
    from carryon_ray.config import BaseModelConfig
    from carryon_ray.data import Example, stream_windows

    path, gguf = resolve_base_path(BaseModelConfig(**base))
    eos = AutoTokenizer.from_pretrained(path, gguf_file=gguf).eos_token_id

    def docs():
        for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
            for ids, key in zip(batch[ROW_INPUT_IDS], batch["key"]):
                yield Example(list(map(int, ids)), [], key)

    out: dict[str, list] = {k: [] for k in ("key", ROW_ID, ROW_INPUT_IDS, ROW_LABELS, "reason", "rows", "length")}
    for w in stream_windows(docs(), eos, max_length):
        for k, v in (("key", w.key), (ROW_ID, sample_id(w.key)), (ROW_INPUT_IDS, w.input_ids), (ROW_LABELS, w.labels),
                     ("reason", ""), ("rows", 0), ("length", len(w.input_ids))):
            out[k].append(v)
        if len(out["key"]) == 1024:
            yield pa.table(out)
            out = {k: [] for k in out}
    if out["key"]:
        yield pa.table(out)


def _packed_stream(good, cfg: CarryOnConfig, data: DataConfig):
    """data.pack in the job: the packing task runs on a worker; the driver holds only block refs."""
    import ray
    import ray.data

    task = ray.remote(num_returns="streaming", num_cpus=cfg.resources.tokenize_cpus)(_pack_windows)
    refs = list(task.remote(good, cfg.base.model_dump(), data.max_length))
    return ray.data.from_arrow_refs(refs).materialize() if refs else good.limit(0)


def ray_pool(lo: int, hi: int):
    from ray.data import ActorPoolStrategy

    return ActorPoolStrategy(min_size=lo, max_size=max(lo, hi))


def _ordered(ds, seed: int, replay: bool):
    """Tag with the replay flag and the order key; sorted by it."""

    def tag(batch: dict) -> dict:
        batch[ROW_REPLAY] = np.full(len(batch["key"]), replay)
        batch["order"] = np.array([order_key(k, seed) for k in batch["key"]], dtype=np.float64)
        return batch

    return ds.map_batches(tag, batch_format="numpy")


def _pack(batch: dict, max_length: int) -> dict:
    """data.pack_examples on Ray: consecutive examples (in training order) packed within a batch."""
    from carryon_ray.data import Example

    out: dict[str, list] = {k: [] for k in ("key", ROW_ID, ROW_INPUT_IDS, ROW_LABELS, ROW_REPLAY, ROW_SEGMENTS,
                                            "order", "length")}
    for replay in (False, True):
        idx = [i for i, r in enumerate(batch[ROW_REPLAY]) if bool(r) == replay]
        examples = [Example(list(batch[ROW_INPUT_IDS][i]), list(batch[ROW_LABELS][i]), str(batch["key"][i]))
                    for i in idx]
        for e in pack_examples(examples, max_length):
            out["key"].append(e.key)
            out[ROW_ID].append(sample_id(e.key))
            out[ROW_INPUT_IDS].append([int(t) for t in e.input_ids])
            out[ROW_LABELS].append([int(t) for t in e.labels])
            out[ROW_REPLAY].append(replay)
            out[ROW_SEGMENTS].append([int(n) for n in e.segments])
            out["order"].append(0.0)
            out["length"].append(len(e.input_ids))
    return columns(out, (ROW_INPUT_IDS, ROW_LABELS, ROW_SEGMENTS, "key"))


def _sums(ds, fn, batch_size: int | None = 4096) -> dict[str, int]:
    """Column sums of fn(batch) over the dataset: one small record per batch comes to the driver
    (Ray's own aggregates shuffle through hundreds of partitions: seconds for a few numbers)."""
    total: dict[str, int] = {}
    for part in ds.map_batches(fn, batch_size=batch_size, batch_format="numpy").take_all():
        for k, v in part.items():
            total[k] = total.get(k, 0) + int(v)
    return total


def _padding(ds, batch_size: int) -> float:
    """Padding share of `ds`'s rows batched in order. Each worker sums over 512 training batches at
    a time, so one record per 512 batches reaches the driver (one per batch grew the driver by
    ~80 MB at 200k rows)."""
    def stats(batch: dict) -> dict:
        lengths = [int(n) for n in batch["length"]]
        return {"real": [sum(lengths)], "padded": [padded_tokens(lengths, batch_size)]}

    s = _sums(ds, stats, batch_size * 512)
    return 1 - s.get("real", 0) / max(s.get("padded", 0), 1)


def _profile(ds) -> list[dict]:
    from carryon_ray.loss import IGNORE

    return [{"tokens": int(r["length"]), "scored_tokens": int(sum(1 for x in r[ROW_LABELS] if x != IGNORE))}
            for r in ds.take(PROFILE_ROWS)]


def ingest(cfg: CarryOnConfig) -> Ingested:
    """Read, tokenize, split, order (and pack) the run's data with Ray Data."""
    d, seed = cfg.data, cfg.train.seed
    reports, profiles = {}, {}
    train, reports["train"] = _tokenized(d.train, cfg, d, "train", seed, d.num_samples)
    if d.val:
        val, reports["val"] = _tokenized(d.val, cfg, d, "val", seed + 1)
    else:
        frac = d.val_fraction
        val = _where(train, lambda k: in_val(k, frac)).materialize()
        if val.count() == 0:  # a tiny set: the row the hash ranks first (as load_splits does)
            first = min((r["key"] for r in train.select_columns(["key"]).take_all()),
                        key=lambda k: unit(k.split("#")[0], "val"))
            val = _where(train, lambda k: k == first).materialize()
        train = _where(train, lambda k: not in_val(k, frac)).materialize()
    n_custom = train.count()
    general = None
    if d.general_val:
        gcfg = d.model_copy(update={"format": "auto", "loss_on_prompt": True, "builtin_size": d.general_rows})
        general, reports["general"] = _tokenized(d.general_val, cfg, gcfg, "general", seed, d.general_rows)
    parts = [_ordered(train, seed, False)]
    n_replay = 0
    if d.replay:
        rcfg = d.model_copy(update={"format": "auto", "loss_on_prompt": True})
        pool, reports["replay"] = _tokenized(d.replay, cfg, rcfg, "replay", seed + 2)
        threshold = d.replay_ratio * n_custom / max(pool.count(), 1)
        replay = _where(pool, lambda k: replay_pick(k, seed, threshold)).materialize()
        n_replay = replay.count()
        profiles["replay"] = (str(d.replay), _profile(replay), "training")
        parts.append(_ordered(replay, seed, True))
    ordered = (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]).sort("order")
    unpacked = _padding(ordered, cfg.train.batch_size)
    if d.pack_examples:
        ordered = ordered.map_batches(_pack, fn_kwargs={"max_length": d.max_length}, batch_size=1024,
                                      batch_format="numpy")
    columns = [ROW_ID, ROW_REPLAY, ROW_INPUT_IDS, ROW_LABELS, "key", "length"] + ([ROW_SEGMENTS] if d.pack_examples
                                                                                   else [])
    per_block, actors = cfg.resources.embed_batch_size, cfg.resources.embed_actors_max
    ordered = _blocks(ordered.select_columns(columns), per_block, actors)
    row_columns = [ROW_ID, ROW_REPLAY, ROW_INPUT_IDS, ROW_LABELS, "key", "length"]
    val = _blocks(_ordered(val, seed, False).sort("order").select_columns(row_columns), per_block, actors)
    if general is not None:
        general = _blocks(_ordered(general, seed, False).select_columns(row_columns), per_block, actors)
    profiles["train"] = (str(d.train), _profile(train), "training")
    profiles["val"] = (str(d.val or f"{d.train} (validation split)"), _profile(val), "validation")
    if general is not None:
        profiles["general"] = (str(d.general_val), _profile(general), "evaluation")
    now = _padding(ordered, cfg.train.batch_size)
    tokens = _sums(ordered, lambda b: {"tokens": [int(np.sum(b["length"]))]}).get("tokens", 0)
    return Ingested(ordered, val, general, ordered.count(), n_custom, n_replay, val.count(), tokens, reports,
                    profiles, (now, unpacked))


# Ray keeps a task's return value in its owner's heap (here: the driver's) when it is smaller than
# 100 KiB (`max_direct_call_object_size`); larger ones go to the object store. Blocks are kept above
# that where the data allows, or the driver would hold the rows of every small block (measured:
# 2.1 MB of driver state for 5,000 rows split into 64 blocks). A dataset too small for that still
# gets 8 blocks per embedding actor (so every actor has work); what the driver may then hold is
# bounded by 8 x actors x 100 KiB, whatever the dataset's size.
MIN_BLOCK_BYTES = 256 * 1024


def _blocks(ds, batch_rows: int, actors: int):
    """Materialize `ds` in blocks of several embedding batches each (at most 64 blocks, each at
    least MIN_BLOCK_BYTES, at least 8 per actor), order kept, so the embedding pool's actors
    share the work from the start.

    This happens here, before any embedding actor exists, and not as a stage of the embedding
    pipeline: on a small cluster the pool's actors and the trainer can hold every CPU, and a
    repartition task queued behind them never runs (a deadlock measured on 2 CPUs: trainer 1 +
    embedding actor 1, the split task pending forever)."""
    ds = ds.materialize()
    # 8 blocks per actor at least: a pool hands an actor several blocks at once, and with one
    # block per actor the first actor up took both (the second node produced nothing).
    n = min(64, ds.count() // batch_rows, max(8 * actors, (ds.size_bytes() or 0) // MIN_BLOCK_BYTES))
    return ds.repartition(n).materialize() if n > 1 else ds


def calibration_rows(ds, n: int) -> list[dict]:
    """The first `n` training rows (the calibration batch: the same rows `carryon train` uses)."""
    return [{ROW_ID: int(r[ROW_ID]), ROW_REPLAY: bool(r[ROW_REPLAY]), ROW_INPUT_IDS: list(map(int, r[ROW_INPUT_IDS])),
             ROW_LABELS: list(map(int, r[ROW_LABELS])), ROW_SEGMENTS: list(map(int, r.get(ROW_SEGMENTS, [])))}
            for r in ds.take(n)]
