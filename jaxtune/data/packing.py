"""Examples -> fixed-length rows: padded one per row, or packed several to a row.

A packed row carries ``segments`` (1, 2, ... per example, 0 for padding). The model attends only
within a segment and restarts positions at each (``segment_ids``), and the target that would cross
from one example into the next carries no loss (:func:`jaxtune.data.to_batch`), so an example's loss
is the same packed or alone.

Rows are built incrementally (:class:`Packer`, :class:`TextCutter`) so that the in-memory path,
``jaxtune.prepare`` and streaming make the same rows from the same examples, in bounded memory: a
packer keeps at most ``window`` rows open, and a text cutter less than one row of tokens. Their
``state()`` is a few arrays, saved beside a prepare's shards and in a streaming run's checkpoint.
"""

from __future__ import annotations

import numpy as np

EMPTY = (np.zeros(0, np.int32), np.zeros(0, np.int8))


def pad_rows(pieces, seq_len: int) -> dict[str, np.ndarray]:
    """One (token ids, loss flags) piece of at most seq_len + 1 tokens per row, padded."""
    n = len(pieces)
    tokens = np.zeros((n, seq_len + 1), np.int32)
    mask = np.zeros((n, seq_len + 1), np.int8)
    loss = np.zeros((n, seq_len + 1), np.int8)
    for i, (ids, on) in enumerate(pieces):
        tokens[i, : len(ids)] = ids
        mask[i, : len(ids)] = 1
        loss[i, : len(ids)] = on
    return {"tokens": tokens, "mask": mask, "loss": loss}


def packed_rows(rows: list[list], seq_len: int) -> dict[str, np.ndarray]:
    """Rows of several (ids, loss flags) pieces each, laid out with their segment numbers."""
    width = seq_len + 1
    out = pad_rows([EMPTY] * len(rows), seq_len)
    out["segments"] = np.zeros((len(rows), width), np.int32)
    for r, members in enumerate(rows):
        at = 0
        for s, (ids, on) in enumerate(members, 1):
            out["tokens"][r, at : at + len(ids)] = ids
            out["mask"][r, at : at + len(ids)] = 1
            out["loss"][r, at : at + len(ids)] = on
            out["segments"][r, at : at + len(ids)] = s
            at += len(ids)
    return out


class Packer:
    """First-fit packing over the ``window`` most recently opened rows (0: every open row, which is
    quadratic in the worst case). A piece that fits in none opens a row; when more than ``window``
    are open, the oldest closes. Rows come out in the order they were opened, so a window at least as
    large as the number of rows packs exactly as first-fit over all of them. Examples are never
    split."""

    def __init__(self, seq_len: int, window: int = 0):
        self.width, self.window = seq_len + 1, window
        self.open: list[list] = []  # pieces per open row, oldest first
        self.room: list[int] = []

    def add(self, ids, on) -> list[list]:
        """Place one piece; returns the rows this closed (lists of pieces)."""
        for r, free in enumerate(self.room):
            if len(ids) <= free:
                self.open[r].append((ids, on))
                self.room[r] -= len(ids)
                return []
        self.open.append([(ids, on)])
        self.room.append(self.width - len(ids))
        if self.window and len(self.open) > self.window:
            self.room.pop(0)
            return [self.open.pop(0)]
        return []

    def flush(self) -> list[list]:
        out, self.open, self.room = self.open, [], []
        return out

    def state(self) -> dict[str, np.ndarray]:
        """The open rows as flat arrays (ids, flags, piece lengths, pieces per row)."""
        pieces = [p for row in self.open for p in row]
        return {
            "ids": np.concatenate([p[0] for p in pieces] or [EMPTY[0]]).astype(np.int32),
            "on": np.concatenate([p[1] for p in pieces] or [EMPTY[1]]).astype(np.int8),
            "lengths": np.asarray([len(p[0]) for p in pieces], np.int64),
            "per_row": np.asarray([len(row) for row in self.open], np.int64),
        }

    def restore(self, state: dict) -> None:
        ids, on = np.asarray(state["ids"], np.int32), np.asarray(state["on"], np.int8)
        ends = np.cumsum(state["lengths"]).astype(int)
        pieces = [(ids[e - n : e], on[e - n : e]) for e, n in zip(ends, state["lengths"], strict=True)]
        self.open, self.room, at = [], [], 0
        for n in np.asarray(state["per_row"], int):
            row = pieces[at : at + n]
            at += n
            self.open.append(row)
            self.room.append(self.width - sum(len(p[0]) for p in row))


def pack(pieces, seq_len: int, window: int = 0) -> dict[str, np.ndarray]:
    """Pieces placed first-fit (over a window of open rows, see :class:`Packer`) into rows of
    seq_len + 1 tokens."""
    packer, rows = Packer(seq_len, window), []
    for ids, on in pieces:
        rows += packer.add(ids, on)
    return packed_rows(rows + packer.flush(), seq_len)


class TextCutter:
    """A stream of documents (EOS after each) cut into rows of seq_len + 1 tokens that overlap by one
    token, so every token after the first is a target exactly once; the last row is padded, not
    dropped. Holds less than one row of tokens between calls."""

    def __init__(self, seq_len: int, eos: int | None):
        self.seq_len = seq_len
        self.end = np.asarray([eos] if eos is not None else [], np.int32)
        self.buffer = np.zeros(0, np.int32)
        self.cut = 0  # rows cut so far
        self.fed = False  # a document came in (no document: no row)

    def add(self, ids) -> list[np.ndarray]:
        """Append one document; returns the full rows it completed."""
        stream = np.concatenate([self.buffer, np.asarray(ids, np.int32), self.end])
        self.fed = True
        width, rows, at = self.seq_len + 1, [], 0
        while len(stream) - at >= width:  # a row starting at ``at`` is complete
            rows.append(stream[at : at + width])
            at += self.seq_len
        self.buffer = stream[at:]
        self.cut += len(rows)
        return rows

    def flush(self) -> list[np.ndarray]:
        """The last row, shorter than the others: the tokens left after the last full row if there are
        at least two (one would be an input with no target), or whatever is left when no row was cut
        yet (a stream of one token still makes a row, as before)."""
        left, self.buffer = self.buffer, np.zeros(0, np.int32)
        if (len(left) < 2 and self.cut) or not self.fed:
            return []
        self.cut += 1
        return [left]

    def state(self) -> dict[str, np.ndarray]:
        return {"buffer": self.buffer, "cut": np.asarray(self.cut, np.int64), "fed": np.asarray(self.fed)}

    def restore(self, state: dict) -> None:
        self.buffer, self.cut = np.asarray(state["buffer"], np.int32), int(state["cut"])
        self.fed = bool(state["fed"])


def cut_rows(rows: list[np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    """Rows of a :class:`TextCutter` as arrays; every real token carries loss."""
    return pad_rows([(r, np.ones(len(r), np.int8)) for r in rows], seq_len)


class RowBuilder:
    """The rows of one stream of examples, as ``config.data`` says: documents cut (``text``), chat or
    instruction pieces packed (``packing``) or one to a row. ``add`` takes a document's ids or an
    example's (ids, flags) and returns the rows it closed; ``arrays`` lays rows out."""

    def __init__(self, c, eos: int | None):
        self.seq_len = c.seq_len
        self.kind = "text" if c.format == "text" else "packed" if c.packing else "padded"
        self.part = None  # what carries state between examples: a cutter, a packer, or nothing
        if self.kind == "text":
            self.part = TextCutter(c.seq_len, eos)
        elif self.kind == "packed":
            self.part = Packer(c.seq_len, c.pack_window)

    def add(self, item) -> list:
        if self.kind == "padded":
            return [item]
        return self.part.add(item) if self.kind == "text" else self.part.add(*item)

    def flush(self) -> list:
        return self.part.flush() if self.part is not None else []

    def arrays(self, rows: list) -> dict[str, np.ndarray]:
        lay = {"text": cut_rows, "packed": packed_rows, "padded": pad_rows}[self.kind]
        return lay(rows, self.seq_len)

    def state(self) -> dict[str, np.ndarray]:
        return self.part.state() if self.part is not None else {}

    def restore(self, state: dict) -> None:
        if self.part is not None:
            self.part.restore(state)
