"""Training batches streamed from files too big to prepare (``data.streaming = True``).

Each process reads its own share of ``data.train``'s files (file i goes to process i mod count), in
an order reshuffled every epoch, one record at a time; records are tokenized in worker processes
(:mod:`.tokenize`) and cut or packed as training goes (:class:`.packing.RowBuilder`, so a packer keeps
at most ``data.pack_window`` rows open). The stream repeats without end: a run sets
``train.max_steps``.

``state()`` is where the reading stands (epoch, file, records read) plus the builder's carried
tokens and the rows made but not yet fed; ``restore(state)`` continues with exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import itertools

import numpy as np

from jaxtune.data import shards, to_batch
from jaxtune.data.packing import RowBuilder
from jaxtune.data.sources import DataError, expand, iterate
from jaxtune.data.tokenize import Tokenizers, chunks


class StreamBatches:
    """Batches of ``len(rows)`` rows (this process's positions in the global batch, default all of
    ``batch_size``) from this process's files of ``c.train``."""

    def __init__(self, c, tokenizer, batch_size: int, seed: int, rows=None, process=(0, 1), workers: int = 0):
        files = expand(c.train, "data.train")
        index, count = process
        if any(f.startswith(("tfds:", "hf:", "prepared:")) for f in files):
            raise DataError("data.streaming reads files; tfds:, hf: and prepared: sources train without it")
        if len(files) < count:
            raise DataError(
                f"data.streaming: data.train has {len(files)} file(s) for {count} processes, each of which "
                "reads its own files; split the corpus into at least as many files"
            )
        self.c, self.seed, self.files = c, seed, files[index::count]
        self.index, self.count = index, count
        self.local = batch_size if rows is None else len(rows)
        self.tokenizer, self.workers = tokenizer, workers or c.workers
        self.builder = RowBuilder(c, tokenizer.eos_token_id)
        self.keys = shards.keys_of(self.builder.kind == "packed")
        self.at = (0, 0, 0)  # epoch, file in the epoch's order, records of that file read
        self.pending = self._empty()
        self._results = None
        self._tokenizers = None

    def _empty(self) -> dict[str, np.ndarray]:
        return {k: np.zeros((0, self.c.seq_len + 1), shards.DTYPES[k]) for k in self.keys}

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.files))

    def _jobs(self):
        """Chunks of records from the current position on, each tagged with the position after it."""
        first, position, read = self.at
        for epoch in itertools.count(first):
            order = self._order(epoch)
            for f in range(position, len(order)):
                records = itertools.islice(
                    iterate(self.files[order[f]], self.c.split, self.c.data_dir), read, None
                )
                for chunk in chunks(records, self.c):
                    read += len(chunk)
                    yield (chunk,), (epoch, f, read)
                read = 0
            position = 0

    def _fill(self) -> None:
        if self._results is None:
            self._tokenizers = Tokenizers(self.tokenizer, self.c, self.workers)
            self._results = self._tokenizers.map(self._jobs())
        rows: list = []
        while len(self.pending["tokens"]) + len(rows) < self.local:
            [(items, _, _)], self.at = next(self._results)
            for item in items:
                rows += self.builder.add(item)
        if rows:
            made = self.builder.arrays(rows)
            self.pending = {k: np.concatenate([self.pending[k], made[k]]) for k in self.keys}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        self._fill()
        batch = {k: v[: self.local] for k, v in self.pending.items()}
        self.pending = {k: v[self.local :] for k, v in self.pending.items()}
        return to_batch(batch)

    def state(self) -> dict:
        """Every process's position (each reads its own files), gathered: a collective."""
        from jaxtune.distributed import gather_json

        own = {
            "at": list(self.at),
            "carry": {k: np.asarray(v).tolist() for k, v in self.builder.state().items()},
            "pending": {k: v.tolist() for k, v in self.pending.items()},
        }
        return {"processes": gather_json(own), "files": len(self.files)}

    def restore(self, saved: dict) -> None:
        if len(saved["processes"]) != self.count:
            raise DataError(
                f"the checkpoint's stream was read by {len(saved['processes'])} processes, this run has "
                f"{self.count}; resume with as many processes"
            )
        state = saved["processes"][self.index]
        self.close()
        self.at = tuple(int(x) for x in state["at"])
        self.builder = RowBuilder(self.c, self.tokenizer.eos_token_id)
        self.builder.restore({k: np.asarray(v) for k, v in state["carry"].items()})
        width = self.c.seq_len + 1
        self.pending = {
            k: np.asarray(v, shards.DTYPES[k]).reshape(-1, width) for k, v in state["pending"].items()
        }

    def close(self) -> None:
        if self._tokenizers is not None:
            self._tokenizers.close()
        self._tokenizers = self._results = None
