"""Tokenizing records in worker processes, in order, with a bounded number of chunks in flight.

``jaxtune.prepare`` and streaming runs both read records in one process and hand chunks of them to
:class:`Tokenizers`; results come back in submission order, so rows do not depend on the number of
workers. Workers are spawned (not forked: the parent may hold JAX's threads) and each receives the
tokenizer once. With one worker, chunks are tokenized in the calling process.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import types

from jaxtune import data

CHUNK_RECORDS = 512  # records per chunk at most
CHUNK_CHARS = 1 << 20  # ... and about this many characters of text

_worker: dict = {}


def settings(c) -> types.SimpleNamespace:
    """The data keys a worker needs (a plain namespace pickles cheaply)."""
    keys = ("format", "seq_len", "loss_on", "too_long", "text_field")
    return types.SimpleNamespace(**{k: c[k] for k in keys})


def _init(tokenizer, c) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _worker.update(tokenizer=tokenizer, c=c)


def tokenize(records, tokenizer, c) -> tuple[list, int, int]:
    """(items, truncated, dropped) of one chunk: documents' ids for text, examples' (ids, flags)."""
    if not records:
        return [], 0, 0
    if c.format == "text":
        return list(data.text_pieces(records, tokenizer, c.text_field)), 0, 0
    return data.example_pieces(records, tokenizer, c)


def _work(chunks):
    return [tokenize(records, _worker["tokenizer"], _worker["c"]) for records in chunks]


def chunks(records, c):
    """Lists of (record, origin) of at most CHUNK_RECORDS records and about CHUNK_CHARS characters."""
    chunk, chars = [], 0
    for record in records:
        chunk.append(record)
        text = record[0].get(c.text_field) if c.format == "text" else None
        chars += len(text) if isinstance(text, str) else 256
        if len(chunk) >= CHUNK_RECORDS or chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


class Tokenizers:
    """``map(jobs)``: each job is (tuple of record lists, tag); yields (tuple of results, tag) in order,
    with at most ``2 x workers`` jobs submitted ahead of the one being read."""

    def __init__(self, tokenizer, c, workers: int = 0):
        self.tokenizer, self.c = tokenizer, settings(c)
        # Default: a core for the reading, cutting and writing process, the others tokenize. With two
        # cores that is one: in process, where a fast tokenizer's batch call uses both cores itself
        # (measured faster than two workers for text: benchmarks/README.md).
        self.workers = workers or max(1, (os.cpu_count() or 1) - 1)
        self.pool = None
        if self.workers > 1:
            ctx = multiprocessing.get_context("spawn")
            self.pool = ctx.Pool(self.workers, initializer=_init, initargs=(tokenizer, self.c))

    def map(self, jobs):
        if self.pool is None:
            for parts, tag in jobs:
                yield [tokenize(p, self.tokenizer, self.c) for p in parts], tag
            return
        pending = collections.deque()
        for parts, tag in jobs:
            pending.append((self.pool.apply_async(_work, (parts,)), tag))
            if len(pending) >= 2 * self.workers:
                result, tag = pending.popleft()
                yield result.get(), tag
        while pending:
            result, tag = pending.popleft()
            yield result.get(), tag

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
