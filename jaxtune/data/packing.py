"""Examples -> fixed-length rows: padded one per row, or packed several to a row.

A packed row carries ``segments`` (1, 2, ... per example, 0 for padding). The model attends only
within a segment and restarts positions at each (``segment_ids``), and the target that would cross
from one example into the next carries no loss (:func:`jaxtune.data.to_batch`), so an example's loss
is the same packed or alone.
"""

from __future__ import annotations

import numpy as np


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


def pack(pieces, seq_len: int) -> dict[str, np.ndarray]:
    """Pieces placed first-fit, in order, into rows of seq_len + 1 tokens; examples are never split."""
    width = seq_len + 1
    rows: list[list[int]] = []  # piece indices per row
    room: list[int] = []
    for i, (ids, _) in enumerate(pieces):
        for r, free in enumerate(room):
            if len(ids) <= free:
                rows[r].append(i)
                room[r] -= len(ids)
                break
        else:
            rows.append([i])
            room.append(width - len(ids))
    out = pad_rows([(np.zeros(0, np.int32), np.zeros(0, np.int8))] * len(rows), seq_len)
    out["segments"] = np.zeros((len(rows), width), np.int32)
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members, 1):
            ids, on = pieces[i]
            out["tokens"][r, at : at + len(ids)] = ids
            out["mask"][r, at : at + len(ids)] = 1
            out["loss"][r, at : at + len(ids)] = on
            out["segments"][r, at : at + len(ids)] = s
            at += len(ids)
    return out
