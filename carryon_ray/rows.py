"""The rows that cross Ray's object store: their column names, the label that carries no loss, and
the one concatenation. Numpy only, on purpose: Ray Data's select, tag and embed-request tasks and
the cache actor import this (through jobs/data.py, actors/service.py, jobs/cache.py), and a
worker process that imports torch for a column name pays ~1.5 s of CPU at its start, once per
process, several processes per job (tests/test_layers.py keeps those modules torch-free)."""

from __future__ import annotations

import numpy as np

IGNORE = -100  # label of tokens that carry no loss (prompt, padding, first-N)

ROW_ID = "sample_id"  # int: position of the sample in the run's training (or validation) rows
ROW_REPLAY = "replay"  # bool: a general-domain replay row (KL to the base) rather than customization data
ROW_INPUT_IDS = "input_ids"  # token ids (token rows only; dropped once the codes exist)
ROW_LABELS = "labels"  # token rows: label ids; embedding rows: int32 bytes at the sample's length
ROW_LENGTH = "length"  # int: tokens in the sample
ROW_SECONDS = "embed_seconds"  # float: this row's share of its batch's producer time (by tokens)
ROW_NODES = "producer_node"  # str: comma-separated node ids of the producers that ran the row
ROW_SEGMENTS = "segments"  # packed rows: the lengths of the examples in the sequence (empty: one example)


def concat_rows(parts: list[dict]) -> dict:
    """Concatenate row column dicts (the producer's outputs) in order."""
    keys = parts[0].keys()
    return {k: np.concatenate([p[k] for p in parts]) for k in keys}
