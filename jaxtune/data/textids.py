"""Token ids of plain texts in bounded memory.

A tokenizer call returns Python lists (and transformers adds offsets and masks): a 50 MB text tokenized
in one call took about 190 times its size in RAM. Here texts are tokenized a bounded number of
characters at a time and kept as int32 arrays, so memory stays a small multiple of the text.

A long text is cut only where cutting cannot change its tokens: after a newline that is followed by a
non-space character, and only where the tokenizer gives the same ids for a window across the cut as
for its two halves. Tokenizers that read every piece as the start of a text (SentencePiece's prefix
space) never pass that check, and their texts are tokenized whole, as before.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import numpy as np

CHUNK_CHARS = 1 << 20  # characters per tokenizer call
WINDOW = 512  # characters each side of a cut that the check tokenizes
TRIES = 8  # cut candidates tried past each chunk's end; none safe: the rest of the text stays whole
_CUT = re.compile(r"\n(?=\S)")


def _encode(tokenizer, texts: list[str]) -> list[np.ndarray]:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [np.asarray(x, np.int32) for x in ids]


def _safe(tokenizer, text: str, at: int) -> bool:
    """Whether cutting ``text`` at ``at`` leaves the ids of a window around it unchanged."""
    left, right = text[max(0, at - WINDOW) : at], text[at : at + WINDOW]
    whole, a, b = _encode(tokenizer, [left + right, left, right])
    return len(whole) == len(a) + len(b) and bool(np.array_equal(whole, np.concatenate([a, b])))


def cuts(tokenizer, text: str, size: int = 0) -> list[str]:
    """``text`` in pieces of about ``size`` characters (CHUNK_CHARS by default) whose ids, concatenated,
    are the ids of the whole."""
    size = size or CHUNK_CHARS
    pieces, start = [], 0
    while len(text) - start > size:
        cut, tried = None, 0
        for m in _CUT.finditer(text, start + size):
            if tried == TRIES:
                break
            tried += 1
            if _safe(tokenizer, text, m.end()):
                cut = m.end()
                break
        if cut is None:
            break  # no safe place: the rest stays in one piece
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def text_ids(tokenizer, texts: Iterable[str], size: int = 0) -> Iterator[np.ndarray]:
    """The ids (no special tokens) of each text, in order, as int32 arrays, computed about ``size``
    characters at a time: short texts batched into one tokenizer call, a long one cut into pieces."""
    size = size or CHUNK_CHARS
    batch, chars = [], 0
    for text in texts:
        if len(text) > size:
            yield from _encode(tokenizer, batch) if batch else ()
            batch, chars = [], 0
            yield np.concatenate([_encode(tokenizer, [piece])[0] for piece in cuts(tokenizer, text, size)])
            continue
        batch.append(text)
        chars += len(text)
        if chars >= size:
            yield from _encode(tokenizer, batch)
            batch, chars = [], 0
    yield from _encode(tokenizer, batch) if batch else ()
