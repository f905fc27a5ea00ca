"""Batches through Grain: seeded shuffling reshuffled every epoch, whole global batches, each process
reading only its share, prefetched on threads, and an iterator state that checkpoints."""

from __future__ import annotations

import logging

import grain
import numpy as np

from jaxtune.data import concat, size, take, to_batch, trim

log = logging.getLogger(__name__)


class Batches:
    """Training batches: each epoch a fresh seeded permutation of the rows cut into global batches (the
    remainder sits out, a different set each epoch); this process gets the rows ``rows`` (positions
    in the global batch: those its devices hold, :func:`jaxtune.sharding.process_rows`; default all)
    of every global batch. With several
    ``parts`` and their ``weights``, each row is drawn from a part with its weight (each part reshuffled
    on every pass through it).

    With ``pad_to_multiple_of``, classification batches are cut to their longest row rounded up to a
    multiple of it (:func:`jaxtune.data.trim`).

    ``state()`` (Grain's iterator state, a small JSON-able dict) goes into the checkpoint;
    ``restore(state)`` continues with exactly the batches an uninterrupted run would have seen.
    """

    def __init__(
        self,
        parts,
        batch_size: int,
        seed: int,
        rows=None,
        weights=(),
        threads: int = 2,
        pad_to_multiple_of: int = 0,
    ):
        parts = list(parts) if isinstance(parts, list | tuple) else [parts]
        sizes = [size(p) for p in parts]
        n = sum(sizes)
        self.steps_per_epoch = n // batch_size
        if not self.steps_per_epoch:
            raise ValueError(
                f"the training data has {n} rows, fewer than one batch of train.batch_size={batch_size}; "
                "add data or lower the batch size"
            )
        mine = np.arange(batch_size) if rows is None else np.asarray(rows)
        if len(parts) == 1:
            if n % batch_size:
                log.info("%d of %d rows sit out each epoch (a different set each epoch)", n % batch_size, n)
            dataset = grain.MapDataset.range(n).shuffle(seed=seed).batch(batch_size, drop_remainder=True)

            def load_rows(index):
                index = np.asarray(index)
                rows = take(parts[0], index[mine])
                if pad_to_multiple_of:
                    rows = trim(rows, parts[0]["attention_mask"][index], pad_to_multiple_of)
                return to_batch(rows)

            dataset = dataset.repeat(None).map(load_rows)
        else:
            streams = [
                grain.MapDataset.range(size).shuffle(seed=seed + i).repeat(None).map(lambda j, i=i: (i, j))
                for i, size in enumerate(sizes)
            ]
            mixed = grain.MapDataset.mix(streams, weights=list(weights)).batch(
                batch_size, drop_remainder=True
            )

            def load(pairs):
                which, index = (np.asarray(x) for x in pairs)
                picked = [take(parts[w], [j]) for w, j in zip(which[mine], index[mine], strict=True)]
                rows = concat(picked)
                if pad_to_multiple_of:
                    masks = np.stack(
                        [parts[w]["attention_mask"][j] for w, j in zip(which, index, strict=True)]
                    )
                    rows = trim(rows, masks, pad_to_multiple_of)
                return to_batch(rows)

            dataset = mixed.map(load)
        options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
        self._iter = iter(dataset.to_iter_dataset(options))

    def state(self) -> dict:
        return self._iter.get_state()

    def close(self) -> None:  # nothing to stop: Grain's threads end with the iterator
        pass

    def restore(self, state: dict) -> None:
        self._iter.set_state(state)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)


def eval_batches(
    rows: dict,
    batch_size: int,
    max_batches: int = 0,
    rows_held=None,
    pad_to_multiple_of: int = 0,
):
    """Every eval row once, in order; the last batch is padded with empty rows (no loss) so that every
    batch has the same shape and the eval step compiles once (once per length with
    ``pad_to_multiple_of``: see :func:`jaxtune.data.trim`). ``rows_held``: the positions of a batch
    this process feeds (default all)."""
    n = size(rows)
    count = -(-n // batch_size)
    if max_batches:
        count = min(count, max_batches)
    mine = np.arange(batch_size) if rows_held is None else np.asarray(rows_held)
    for b in range(count):
        index = b * batch_size + mine
        real = index < n
        part = take(rows, np.where(real, index, 0))
        part = {
            k: np.where(real.reshape(-1, *[1] * (v.ndim - 1)), v, 0).astype(v.dtype) for k, v in part.items()
        }
        if pad_to_multiple_of:
            every = np.arange(b * batch_size, min((b + 1) * batch_size, n))
            part = trim(part, rows["attention_mask"][every], pad_to_multiple_of)
        yield to_batch(part)
