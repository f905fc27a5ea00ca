"""Seeded, resumable batches of rows, each process reading only its share of every global batch."""

from __future__ import annotations

import logging

import numpy as np

from jaxtune.data import take, to_batch

log = logging.getLogger(__name__)


class Batches:
    """Training batches: every epoch a fresh seeded permutation of the rows, cut into global batches.

    The position (epoch, batch index) is the whole state: ``state()`` goes into the checkpoint and
    ``restore(state)`` continues with exactly the batches an uninterrupted run would have seen.
    """

    def __init__(
        self, rows: dict, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1
    ):
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.process_index, self.process_count = process_index, process_count
        n = len(rows["tokens"])
        self.steps_per_epoch = n // batch_size
        if not self.steps_per_epoch:
            raise ValueError(
                f"the training data has {n} rows, fewer than one batch of train.batch_size={batch_size}; "
                "add data or lower the batch size"
            )
        if n % batch_size:
            log.info(
                "%d of %d rows fall outside each epoch's full batches (a different set each epoch)",
                n % batch_size,
                n,
            )
        self.epoch = self.index = 0
        self._order = (None, None)

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def order(self, epoch: int) -> np.ndarray:
        if self._order[0] != epoch:
            self._order = (
                epoch,
                np.random.default_rng([self.seed, epoch]).permutation(len(self.rows["tokens"])),
            )
        return self._order[1]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.index == self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        bs = self.batch_size
        rows = self.order(self.epoch)[self.index * bs : (self.index + 1) * bs]
        self.index += 1
        share = bs // self.process_count
        return to_batch(take(self.rows, rows[self.process_index * share : (self.process_index + 1) * share]))


def eval_batches(
    rows: dict, batch_size: int, max_batches: int = 0, process_index: int = 0, process_count: int = 1
):
    """Every eval row once, in order; the last batch is padded with empty rows (no loss) so that every
    batch has the same shape and the eval step compiles once."""
    n = len(rows["tokens"])
    count = -(-n // batch_size)
    if max_batches:
        count = min(count, max_batches)
    share = batch_size // process_count
    for b in range(count):
        index = np.arange(b * batch_size, (b + 1) * batch_size)[
            process_index * share : (process_index + 1) * share
        ]
        real = index < n
        part = take(rows, np.where(real, index, 0))
        part = {k: np.where(real[:, None], v, 0).astype(v.dtype) for k, v in part.items()}
        yield to_batch(part)
