"""Prepared data on disk: token rows in ArrayRecord shards, described by ``index.json``.

A row is one record: its ``tokens`` (int32), ``mask`` and ``loss`` (int8) and, for packed rows,
``segments`` (int32), each ``seq_len + 1`` long, as raw bytes one after the other. ArrayRecord reads
any record by its number (group size 1), so training draws rows in a global shuffle without holding
the corpus: :class:`PreparedRows` keeps only each shard's reader and row count.

``index.json`` (written last, atomically) lists the shards of each training part and of the eval rows
with their row counts and sizes, and what the rows depend on (the tokenizer's fingerprint, the chat
template, format, seq_len, the sources' fingerprints); :func:`check` compares it with a run's config.
"""

from __future__ import annotations

import json
import os

import numpy as np

from jaxtune.errors import DataError

INDEX = "index.json"
VERSION = 1
DTYPES = {"tokens": np.int32, "mask": np.int8, "loss": np.int8, "segments": np.int32}


def keys_of(packed: bool) -> list[str]:
    return ["tokens", "mask", "loss", *(["segments"] if packed else [])]


def write_shard(path: str, rows: dict[str, np.ndarray]) -> int:
    """Write rows as one shard (under a temporary name, renamed when complete); returns its bytes."""
    from array_record.python.array_record_module import ArrayRecordWriter

    tmp = f"{path}.tmp"
    keys = [k for k in DTYPES if k in rows]
    columns = [np.ascontiguousarray(rows[k], DTYPES[k]) for k in keys]
    writer = ArrayRecordWriter(tmp, "group_size:1")
    for i in range(len(columns[0])):
        writer.write(b"".join(col[i].tobytes() for col in columns))
    writer.close()
    os.replace(tmp, path)
    return os.path.getsize(path)


def read_index(folder: str) -> dict:
    path = os.path.join(folder, INDEX)
    if not os.path.exists(path):
        raise DataError(
            f"{path}: not found; prepare the data first (python -m jaxtune.prepare --config CONFIG "
            f"--out {folder}), or finish an interrupted prepare by running it again"
        )
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(
            f"{path}: not a valid index ({e}); delete {folder} and run python -m jaxtune.prepare again"
        ) from e
    if index.get("version") != VERSION:
        raise DataError(
            f"{path}: index version {index.get('version')!r}, this jaxtune reads {VERSION}; delete {folder} "
            "and prepare it again"
        )
    return index


def check(index: dict, folder: str, c, tokenizer_fp: str, chat_template) -> None:
    """The prepared rows must be the rows ``config.data`` asks for: same tokenizer, format, seq_len,
    packing and (for chat formats) template and loss; a difference is one line naming it."""
    wanted = {
        "tokenizer": tokenizer_fp,
        "format": c.format,
        "seq_len": c.seq_len,
        "packing": bool(c.packing) and c.format != "text",
    }
    if c.format != "text":
        wanted |= {"chat_template": chat_template, "loss_on": c.loss_on}
    for key, value in wanted.items():
        if index.get(key) != value:
            what = "the run's tokenizer" if key == "tokenizer" else f"data.{key} = {value!r}"
            had = "another tokenizer" if key == "tokenizer" else repr(index.get(key))
            raise DataError(
                f"{os.path.join(folder, INDEX)}: prepared with {key} {had}, but the config has {what}; "
                f"prepare the data again with this config (python -m jaxtune.prepare) or match the config"
            )


class PreparedRows:
    """The rows of some shards, read by row number (:meth:`take`); ``len()`` counts them.

    Opening checks every shard's size against the index, so a truncated or missing shard is found
    before training starts; a damaged record is found when it is read. Both are one-line errors."""

    def __init__(self, folder: str, shards: list[dict], packed: bool, width: int):
        import grain
        from array_record.python.array_record_module import ArrayRecordReader

        self.keys = keys_of(packed)
        self.width = width
        self.paths, counts = [], []
        for shard in shards:
            path = os.path.join(folder, shard["file"])
            if not os.path.exists(path) or os.path.getsize(path) != shard["bytes"]:
                got = os.path.getsize(path) if os.path.exists(path) else "missing"
                raise DataError(
                    f"{path}: corrupt shard ({got} bytes, the index says {shard['bytes']}); delete "
                    f"{folder} and run python -m jaxtune.prepare again"
                )
            try:
                reader = ArrayRecordReader(path)
                n = reader.num_records()
                reader.close()
            except Exception as e:  # array_record raises RuntimeError / ValueError on damage
                raise DataError(f"{path}: corrupt shard ({e}); delete {folder} and prepare it again") from e
            if n != shard["rows"]:
                raise DataError(
                    f"{path}: corrupt shard ({n} rows, the index says {shard['rows']}); delete {folder} "
                    "and prepare it again"
                )
            self.paths.append(path)
            counts.append(n)
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        # Grain's source reads any record of the shards by its global number, safely from its threads.
        self.source = grain.sources.ArrayRecordDataSource(self.paths) if self.paths else None
        self.sizes = [(k, np.dtype(DTYPES[k]).itemsize * width) for k in self.keys]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def _decode(self, blob: bytes, row: int) -> list[np.ndarray]:
        if len(blob) != sum(n for _, n in self.sizes):
            path = self.paths[int(np.searchsorted(self.starts, row, side="right")) - 1]
            raise DataError(f"{path}: corrupt shard (a record of {len(blob)} bytes); prepare the data again")
        out, at = [], 0
        for key, n in self.sizes:
            out.append(np.frombuffer(blob, DTYPES[key], self.width, at))
            at += n
        return out

    def take(self, index) -> dict[str, np.ndarray]:
        """The rows at ``index`` (global row numbers), stacked."""
        index = [int(i) for i in np.asarray(index, np.int64).reshape(-1)]
        if index and not 0 <= min(index) <= max(index) < len(self):
            raise IndexError(f"rows {min(index)}..{max(index)} of {len(self)}")
        try:
            blobs = self.source.__getitems__(index)
        except Exception as e:  # a damaged chunk: riegeli's checksum or a short read
            shard = self.paths[int(np.searchsorted(self.starts, index[0], side="right")) - 1]
            raise DataError(
                f"{shard} (or a shard after it): corrupt shard ({e}); prepare the data again"
            ) from e
        rows = [self._decode(blob, i) for blob, i in zip(blobs, index, strict=True)]
        return {k: np.stack([r[j] for r in rows]) for j, k in enumerate(self.keys)}


def open_part(folder: str, index: dict, part: dict) -> PreparedRows:
    return PreparedRows(folder, part["shards"], index["packing"], index["seq_len"] + 1)
