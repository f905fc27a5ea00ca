"""Training batches streamed from files too big to prepare (``data.streaming = True``).

The processes that feed the same rows of the global batch form a reader (usually one per process;
processes that hold the same rows, as when a tensor axis spans hosts, read alike). Reader r of R reads
the files i with i mod R = r, in an order reshuffled every epoch, one record at a time; records are
tokenized a chunk at a time (:mod:`.workers`) and cut or packed as training goes
(:class:`.packing.RowBuilder`: a packer keeps at most ``data.pack_window`` rows open). The stream
repeats without end: a run sets ``train.max_steps``.

``state()`` holds, for the last chunk read: where it starts (epoch, file, record), the builder's
carried state and the rows pending before it, and how many rows have been fed since. A restore
reads that chunk again and drops the rows already fed, so it continues with exactly the batches an
uninterrupted run would have seen, and the state stays the size of a batch (plus a packer's open
rows) however long the chunk's documents.
"""

from __future__ import annotations

import itertools
import logging
import os

import numpy as np

from jaxtune.data import shards, to_batch
from jaxtune.data.packing import RowBuilder
from jaxtune.data.sources import DataError, expand, iterate
from jaxtune.data.workers import Tokenizers, chunks

log = logging.getLogger(__name__)


def reader_of(rows, process: tuple[int, int]) -> tuple[int, int]:
    """(this process's reader, readers): processes that feed the same rows share one; rows shared in
    part are an error (nothing could feed both alike). A collective when there are several processes."""
    index, count = process
    if count == 1:
        return 0, 1
    from jaxtune.distributed import gather_json

    every = [tuple(sorted(r)) for r in gather_json([int(x) for x in rows])]
    distinct = sorted(set(every))
    for a, b in itertools.combinations(distinct, 2):
        if set(a) & set(b):
            raise DataError(
                "data.streaming: processes feed overlapping but different rows of the batch; use a mesh "
                "whose batch rows are split whole between processes, or prepare the data instead"
            )
    return distinct.index(every[index]), len(distinct)


def _files_id(files: list[str]) -> list:
    return [[f, os.path.getsize(f)] for f in files]


class StreamBatches:
    """Batches of ``len(rows)`` rows (this process's positions in the global batch, default all of
    ``batch_size``) from the files of ``c.train`` that ``reader`` (index, count: :func:`reader_of`)
    reads; ``process`` (index, count) places this process's position in a checkpoint's."""

    def __init__(
        self, c, tokenizer, batch_size: int, seed: int, rows=None, reader=(0, 1), process=(0, 1), workers=0
    ):
        files = expand(c.train, "data.train")
        if any(f.startswith(("tfds:", "hf:", "prepared:")) for f in files):
            raise DataError("data.streaming reads files; tfds:, hf: and prepared: sources train without it")
        rows = np.arange(batch_size) if rows is None else np.asarray(rows)
        reader, readers = reader
        if len(files) < readers:
            raise DataError(
                f"data.streaming: data.train has {len(files)} file(s) for {readers} readers (processes "
                "that feed different rows), each of which reads its own files; split the corpus into at "
                "least as many files"
            )
        self.c, self.seed, self.files = c, seed, files[reader::readers]
        self.index, self.count = process
        self.local = len(rows)
        self.tokenizer, self.workers = tokenizer, workers or c.workers
        self.keys = shards.keys_of(c.packing and c.format != "text")
        self._warned = False
        self._start((0, 0, 0), RowBuilder(c, tokenizer.eos_token_id), self._empty())

    def _start(self, at, builder, pending) -> None:
        """Read on from ``at`` (epoch, file in the epoch's order, record of the file)."""
        self.at, self.builder, self.pending = at, builder, pending
        self._results = self._tokenizers = None
        self.snapshot = self._snap(list(at), pulled=False)

    def _snap(self, at, pulled: bool) -> dict:
        """What a checkpoint keeps: the position, the builder's state and the pending rows, before the
        chunk at ``at`` is read (``pulled``: it was read since), and the rows fed since."""
        return {
            "at": at,
            "carry": self.builder.state(),
            "pending": dict(self.pending),
            "fed": 0,
            "pulled": pulled,
        }

    def _empty(self) -> dict[str, np.ndarray]:
        return {k: np.zeros((0, self.c.seq_len + 1), shards.DTYPES[k]) for k in self.keys}

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.files))

    def _jobs(self):
        """Chunks of records from ``self.at`` on, each tagged with the position it starts at."""
        first, position, read = self.at
        for epoch in itertools.count(first):
            order = self._order(epoch)
            for f in range(position, len(order)):
                records = iterate(self.files[order[f]], self.c.split, self.c.data_dir)
                for chunk in chunks(itertools.islice(records, read, None), self.c):
                    yield (chunk,), (epoch, f, read)
                    read += len(chunk)
                read = 0
            position = 0

    def _next_chunk(self) -> tuple[list, tuple]:
        if self._results is None:
            self._tokenizers = Tokenizers(self.tokenizer, self.c, self.workers)
            self._results = self._tokenizers.map(self._jobs())
        [(items, truncated, dropped)], at = next(self._results)
        if (truncated or dropped) and not self._warned:
            self._warned = True
            log.warning(
                "data.streaming: examples longer than seq_len + 1 = %d tokens are %s (data.too_long)",
                self.c.seq_len + 1,
                "truncated" if truncated else "dropped",
            )
        return items, at

    def _pull(self) -> list:
        """Read the next chunk and add its rows to ``pending``; the snapshot is the state before it."""
        snapshot = self._snap(None, pulled=True)
        items, self.at = self._next_chunk()
        snapshot["at"], self.snapshot = list(self.at), snapshot
        rows = [row for item in items for row in self.builder.add(item)]
        if rows:
            made = self.builder.arrays(rows)
            self.pending = {k: np.concatenate([self.pending[k], made[k]]) for k in self.keys}
        return items

    def _fill(self) -> None:
        fed_in = self.at[0]  # the epoch of the last example that came through
        while len(self.pending["tokens"]) < self.local:
            fed_in = self.at[0] if self._pull() else fed_in
            if self.at[0] > fed_in + 1:  # a whole pass over the files gave no example
                raise DataError(
                    f"data.streaming: a whole pass over {len(self.files)} file(s) of data.train gave no "
                    "example (every one dropped as too long?); raise data.seq_len or check the files"
                )

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        self._fill()
        batch = {k: v[: self.local] for k, v in self.pending.items()}
        self.pending = {k: v[self.local :] for k, v in self.pending.items()}
        self.snapshot["fed"] += self.local
        return to_batch(batch)

    def state(self) -> dict:
        """Every process's position (each reader reads its own files), gathered: a collective."""
        from jaxtune.distributed import gather_json

        snap = self.snapshot
        own = {
            "at": snap["at"],
            "carry": {k: np.asarray(v).tolist() for k, v in snap["carry"].items()},
            "pending": {k: np.asarray(v).tolist() for k, v in snap["pending"].items()},
            "fed": snap["fed"],
            "pulled": snap["pulled"],
            "files": _files_id(self.files),
        }
        return {"processes": gather_json(own)}

    def restore(self, saved: dict) -> None:
        if "processes" not in saved:
            raise DataError(
                "the checkpoint's data position is not a stream's (it was saved without data.streaming); "
                "resume with the data settings it was made with, or use another --workdir"
            )
        if len(saved["processes"]) != self.count:
            raise DataError(
                f"the checkpoint's stream was read by {len(saved['processes'])} processes, this run has "
                f"{self.count}; resume with as many processes"
            )
        state = saved["processes"][self.index]
        if state["files"] != _files_id(self.files):
            raise DataError(
                "data.streaming: the files of data.train changed since the checkpoint (names or sizes); "
                "resume on the same files, or start a new --workdir"
            )
        self.close()
        builder = RowBuilder(self.c, self.tokenizer.eos_token_id)
        builder.restore({k: np.asarray(v) for k, v in state["carry"].items()})
        width = self.c.seq_len + 1
        pending = {k: np.asarray(v, shards.DTYPES[k]).reshape(-1, width) for k, v in state["pending"].items()}
        self._start(tuple(int(x) for x in state["at"]), builder, pending)
        if state["pulled"]:  # the chunk read after the snapshot, read again
            self._pull()
        fed = int(state["fed"])
        self.pending = {k: v[fed:] for k, v in self.pending.items()}
        self.snapshot["fed"] = fed

    def close(self) -> None:
        if self._tokenizers is not None:
            self._tokenizers.close()
        self._tokenizers = self._results = None
