"""Training data: sources -> records -> token rows -> batches.

A language-model row holds ``seq_len + 1`` tokens (``seq_len`` input/next-token pairs) with masks of
the same length: ``mask`` (a real token), ``loss`` (its prediction counts) and, for packed rows,
``segments`` (which example a token belongs to; 0 is padding). Formats:

- ``text``: each record's text, EOS appended, concatenated and cut into rows overlapping by one token;
- ``chat``: a ``messages`` list rendered with the tokenizer's chat template; loss on the assistant's
  turns (``data.loss_on = "all"`` for every token);
- ``instruction``: Alpaca-style ``instruction`` / ``input`` / ``output`` fields, made a user turn and an
  assistant turn, then as ``chat``;
- ``classification``: a text (or text pair) and a label; see :mod:`jaxtune.data.classify`.

Chat and instruction examples longer than a row are truncated or dropped (``data.too_long``) and
counted in the log; with ``data.packing`` several examples share a row (see :mod:`.packing`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np

from jaxtune.data.packing import pack, pad_rows
from jaxtune.data.sources import DataError, expand, read
from jaxtune.data.textids import text_ids

log = logging.getLogger(__name__)
__all__ = ["DataError", "load", "records", "to_batch", "take", "train_groups"]


def records(spec: str, key: str, split: str, data_dir: str = "") -> list[tuple[dict, str]]:
    return [r for source in expand(spec, key) for r in read(source, split, data_dir)]


def train_groups(c) -> list[list[tuple[dict, str]]]:
    """The training records of ``config.data``: one list per mixture component (each source in
    ``data.train`` when ``data.weights`` is set, else one list of all), each cut to the first
    ``data.max_train_records``."""
    sources = expand(c.train, "data.train")
    if c.weights and len(c.weights) != len(sources):
        raise DataError(
            f"data.weights has {len(c.weights)} weights but data.train names {len(sources)} sources "
            f"({', '.join(sources)}); give one weight per source"
        )
    groups = [[s] for s in sources] if c.weights else [sources]
    limit = c.max_train_records or None
    out = [[r for source in group for r in read(source, c.split, c.data_dir)][:limit] for group in groups]
    return [_dedupe(recs, c) for recs in out] if c.dedupe else out


def _dedupe(recs, c):
    """The first of each set of equal records (for classification: equal texts, whatever their labels),
    before any held-out split, so no text is both trained and evaluated on; the count goes to the log."""
    fields = (c.text_field, c.text_pair_field) if c.format == "classification" else None
    seen, out = set(), []
    for record, origin in recs:
        key = json.dumps([record.get(f) for f in fields] if fields else record, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append((record, origin))
    if len(out) < len(recs):
        log.info("data.dedupe: dropped %d repeated records of %d", len(recs) - len(out), len(recs))
    return out


def _field(record: dict, name: str, origin: str):
    if name not in record:
        raise DataError(
            f"{origin}: no field {name!r} (fields: {', '.join(record)}); set the data.*_field keys"
        )
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"{origin}: field {name!r} is a {type(value).__name__}, not text")
    return value


def text_rows(recs, tokenizer, seq_len: int, field: str = "text") -> dict[str, np.ndarray]:
    """Each record a document, EOS after each; the stream is cut into rows overlapping by one token so
    every token after the first is a target exactly once. The last row is padded, not dropped.
    Tokenized in bounded pieces (:mod:`.textids`), so memory stays a small multiple of the text."""
    eos = tokenizer.eos_token_id
    texts = (_field(record, field, origin) for record, origin in recs)
    end = np.asarray([eos] if eos is not None else [], np.int32)
    stream = np.concatenate([part for ids in text_ids(tokenizer, texts) for part in (ids, end)] or [end[:0]])
    width, starts = seq_len + 1, range(0, max(len(stream) - 1, 1), seq_len)
    tokens = np.zeros((len(starts), width), np.int32)
    mask = np.zeros((len(starts), width), np.int8)
    for r, s in enumerate(starts):
        piece = stream[s : s + width]
        tokens[r, : len(piece)] = piece
        mask[r, : len(piece)] = 1
    return {"tokens": tokens, "mask": mask, "loss": mask.copy()}


def render(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """A conversation rendered with the chat template, and the character spans that carry loss: each
    assistant turn's text and end-of-turn marker (not the whitespace the template puts after it),
    found through the rendered prefix before each reply."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        if not (text.startswith(upto) and upto.startswith(before)):
            raise DataError(
                "the chat template does not render conversations prefix by prefix; set data.loss_on='all'"
            )
        spans.append((len(before), len(upto.rstrip())))
    return text, spans


def _flags(offsets, spans, loss_on: str) -> np.ndarray:
    if loss_on == "all":
        return np.ones(len(offsets), np.int8)
    return np.array([any(a <= s < b for a, b in spans) for s, _ in offsets], np.int8)


def tokenize_chats(
    tokenizer, conversations, loss_on: str = "assistant"
) -> list[tuple[list[int], np.ndarray]]:
    """Token ids of each conversation and 1 on the tokens that carry loss (see :func:`render`), in one
    batched tokenizer call: a fast tokenizer encodes the whole list in parallel."""
    rendered = [render(tokenizer, messages) for messages in conversations]
    enc = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    return [
        (ids, _flags(offsets, spans, loss_on))
        for (_, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"], strict=True)
    ]


def chat_tokens(tokenizer, messages: list[dict], loss_on: str = "assistant") -> tuple[list[int], np.ndarray]:
    """:func:`tokenize_chats` of one conversation."""
    return tokenize_chats(tokenizer, [messages], loss_on)[0]


def instruction_messages(record: dict, origin: str) -> list[dict]:
    """Alpaca's fields as a user turn (instruction, then the input if any) and an assistant turn."""
    prompt = _field(record, "instruction", origin)
    extra = record.get("input") or ""
    if extra:
        prompt = f"{prompt}\n\n{extra}"
    return [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": _field(record, "output", origin)},
    ]


def chat_messages(record: dict, origin: str) -> list[dict]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f"{origin}: no 'messages' list; chat records need [{{'role': ..., 'content': ...}}, ...]"
        )
    for m in messages:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise DataError(f"{origin}: a message is not {{'role': str, 'content': str}}: {m!r}")
    return messages


def example_rows(recs, tokenizer, c) -> dict[str, np.ndarray]:
    """Rows of chat or instruction examples, packed or one per row."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            f"the tokenizer has no chat template, which data.format={c.format!r} needs; use a chat model"
        )
    to_messages = instruction_messages if c.format == "instruction" else chat_messages
    conversations = [to_messages(record, origin) for record, origin in recs]
    pieces, truncated, dropped = [], 0, 0
    limit = c.seq_len + 1
    for ids, on in tokenize_chats(tokenizer, conversations, c.loss_on):
        if len(ids) > limit:
            if c.too_long == "drop":
                dropped += 1
                continue
            truncated += 1
            ids, on = ids[:limit], on[:limit]
        pieces.append((ids, on))
    if truncated or dropped:
        what = "truncated" if truncated else "dropped"
        log.warning(
            "%d of %d examples were longer than seq_len + 1 = %d tokens and were %s (data.too_long)",
            truncated or dropped,
            len(recs),
            limit,
            what,
        )
    if not pieces:
        raise DataError(
            "every example was dropped as too long; raise data.seq_len or set data.too_long='truncate'"
        )
    return pack(pieces, c.seq_len) if c.packing else pad_rows(pieces, c.seq_len)


def rows(recs, tokenizer, c, labels=None) -> dict[str, np.ndarray]:
    if c.format == "text":
        return text_rows(recs, tokenizer, c.seq_len, c.text_field)
    if c.format == "classification":
        from jaxtune.data.classify import classification_rows

        return classification_rows(recs, tokenizer, c, labels)
    return example_rows(recs, tokenizer, c)


def size(rows: dict) -> int:
    return len(next(iter(rows.values())))


def _held_out(recs, tokenizer, c, seed: int, labels=None) -> tuple[dict, dict | None]:
    """(train rows, held-out rows) of one source's records, holding out ``c.eval_fraction`` of the
    records (of the rows, for a single text document)."""
    if not c.eval_fraction:
        return rows(recs, tokenizer, c, labels), None

    def split(n):  # sorted (kept, held-out) indices of n items
        order = np.random.default_rng(seed).permutation(n)
        held = max(1, int(round(n * c.eval_fraction)))
        return np.sort(order[held:]), np.sort(order[:held])

    if c.format == "text" and len(recs) < 2:
        all_rows = rows(recs, tokenizer, c)
        kept, held = split(size(all_rows))
        return take(all_rows, kept), take(all_rows, held)
    kept, held = split(len(recs))
    return rows([recs[i] for i in kept], tokenizer, c, labels), rows(
        [recs[i] for i in held], tokenizer, c, labels
    )


def concat(parts: list[dict]) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _cache_key(c, tokenizer, seed: int, labels) -> str:
    """What the rows depend on: the data config, the seed (the held-out split), the tokenizer and chat
    template, and each local file's size and modification time (tfds: / hf: sources by name)."""
    files = []
    for spec in (c.train, c.eval):
        for source in expand(spec, "data") if spec else []:
            stat = None if source.startswith(("tfds:", "hf:")) else os.stat(source)
            files.append((source, stat and stat.st_size, stat and stat.st_mtime_ns))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    blob = json.dumps(
        [c.to_dict(), seed, files, getattr(tokenizer, "chat_template", None), labels], default=str
    )
    return hashlib.sha256((blob + vocab).encode()).hexdigest()[:24]


def load(c, tokenizer, seed: int, labels=None) -> tuple[list[dict], dict | None]:
    """(train rows, one dict per mixture component; eval rows or None) for a run's ``config.data``.

    With ``data.weights`` each source in ``data.train`` is a mixture component sampled with its weight;
    without, all sources form one. With ``data.cache_dir`` the rows are kept there (a .npz named by
    everything they depend on) and read back on the next run instead of tokenizing again.
    ``labels`` (label names by id, from :func:`jaxtune.data.classify.label_map`) for classification.
    """
    if not c.cache_dir:
        return _load(c, tokenizer, seed, labels)
    path = os.path.join(c.cache_dir, f"rows-{_cache_key(c, tokenizer, seed, labels)}.npz")
    if os.path.exists(path):
        with np.load(path) as saved:
            arrays = dict(saved)
        n = int(arrays.pop("parts"))
        parts = [
            {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(f"train{i}/")} for i in range(n)
        ]
        held = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("eval/")}
        log.info("tokenized rows read from the cache %s", path)
        return parts, held or None
    parts, held = _load(c, tokenizer, seed, labels)
    arrays = {f"train{i}/{k}": v for i, p in enumerate(parts) for k, v in p.items()}
    arrays.update({f"eval/{k}": v for k, v in (held or {}).items()})
    os.makedirs(c.cache_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(tmp, parts=len(parts), **arrays)
    os.replace(tmp, path)  # a complete file or none, even if two processes race
    log.info("tokenized rows cached in %s", path)
    return parts, held


def _load(c, tokenizer, seed: int, labels=None) -> tuple[list[dict], dict | None]:
    parts, held = [], []
    for recs in train_groups(c):
        train_rows, held_rows = _held_out(recs, tokenizer, c, seed, labels)
        parts.append(train_rows)
        held += [held_rows] if held_rows is not None else []
    if c.eval:
        return parts, rows(records(c.eval, "data.eval", c.eval_split, c.data_dir), tokenizer, c, labels)
    return parts, concat(held) if held else None


def take(rows: dict, index) -> dict:
    return {k: v[index] for k, v in rows.items()}


TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")  # per-token arrays of classification rows


def trim(rows: dict, masks, multiple: int) -> dict:
    """Classification rows cut to the longest row of ``masks`` (the attention masks of the whole global
    batch, so every process cuts alike) rounded up to a multiple of ``multiple``: each batch pays for the
    length it needs, and the step compiles once per length (at most seq_len / multiple of them). The
    rows are right-padded, so only padding goes."""
    if not multiple or "labels" not in rows:
        return rows
    width = masks.shape[1]
    longest = max(int(np.asarray(masks).sum(1).max()), 1)
    length = min(-(-longest // multiple) * multiple, width)
    return {k: v[:, :length] if k in TOKEN_KEYS else v for k, v in rows.items()}


def to_batch(rows: dict) -> dict[str, np.ndarray]:
    """Model inputs and targets from rows of seq_len + 1 tokens. In packed rows the target that
    crosses from one example into the next carries no loss, and positions restart per example.
    Classification rows are model inputs already."""
    if "labels" in rows:
        return dict(rows)
    tokens, mask, loss = rows["tokens"], rows["mask"], rows["loss"]
    keep = loss[:, 1:] * mask[:, 1:] * mask[:, :-1]
    batch = {
        "input_ids": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "attention_mask": mask[:, :-1].astype(np.int32),
    }
    if "segments" in rows:
        seg = rows["segments"]
        keep = keep * (seg[:, 1:] == seg[:, :-1])
        batch["segment_ids"] = seg[:, :-1].astype(np.int32)
    batch["loss_mask"] = keep.astype(np.float32)
    return batch


def training_labels(config):
    """A classifier's label space, read from the training split alone (None for other tasks)."""
    from jaxtune.data.classify import REGRESSION, label_map

    if config.data.format != "classification":
        return None
    records = [r for group in train_groups(config.data) for r in group]
    labels = label_map(records, config.data.label_field, config.model.problem_type)
    names = "one value per example" if labels.problem_type == REGRESSION else ", ".join(labels.names)
    log.info("%s, %d label(s) from the training data: %s", labels.problem_type, labels.num_labels, names)
    return labels
