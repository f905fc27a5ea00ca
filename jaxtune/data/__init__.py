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
import types

import numpy as np

from jaxtune.data.packing import RowBuilder
from jaxtune.data.sources import DataError, expand, fingerprint, read
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


def record_key(record: dict, c) -> str:
    """What makes two records equal for ``data.dedupe``: the whole record (for classification, its
    texts alone)."""
    fields = (c.text_field, c.text_pair_field) if c.format == "classification" else None
    return json.dumps([record.get(f) for f in fields] if fields else record, sort_keys=True, default=str)


def _dedupe(recs, c):
    """The first of each set of equal records (for classification: equal texts, whatever their labels),
    before any held-out split, so no text is both trained and evaluated on; the count goes to the log."""
    seen, out = set(), []
    for record, origin in recs:
        key = record_key(record, c)
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
    """Each record a document, EOS after each; the stream is cut into rows overlapping by one token
    (:class:`.packing.TextCutter`). Tokenized in bounded pieces (:mod:`.textids`), so memory stays a
    small multiple of the text."""
    c = types.SimpleNamespace(format="text", seq_len=seq_len)
    return build_rows(RowBuilder(c, tokenizer.eos_token_id), text_pieces(recs, tokenizer, field))


def text_pieces(recs, tokenizer, field: str = "text"):
    """The token ids of each record's text."""
    return text_ids(tokenizer, (_field(record, field, origin) for record, origin in recs))


def build_rows(builder: RowBuilder, items) -> dict[str, np.ndarray]:
    """Every row of ``items`` (documents' ids or examples' pieces) through ``builder``, as arrays."""
    out = [row for item in items for row in builder.add(item)]
    return builder.arrays(out + builder.flush())


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


def example_pieces(recs, tokenizer, c) -> tuple[list, int, int]:
    """(ids, loss flags) of each chat or instruction example that fits a row (those longer than
    seq_len + 1 tokens truncated or dropped, ``data.too_long``), and how many were truncated and
    dropped."""
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
        pieces.append((np.asarray(ids, np.int32), on))
    return pieces, truncated, dropped


def report_too_long(truncated: int, dropped: int, total: int, c) -> None:
    """The log line of :func:`example_pieces`' counts; no example left is an error."""
    if truncated or dropped:
        what = "truncated" if truncated else "dropped"
        log.warning(
            "%d of %d examples were longer than seq_len + 1 = %d tokens and were %s (data.too_long)",
            truncated or dropped,
            total,
            c.seq_len + 1,
            what,
        )
    if dropped and dropped == total:
        raise DataError(
            "every example was dropped as too long; raise data.seq_len or set data.too_long='truncate'"
        )


def example_rows(recs, tokenizer, c) -> dict[str, np.ndarray]:
    """Rows of chat or instruction examples, packed or one per row."""
    pieces, truncated, dropped = example_pieces(recs, tokenizer, c)
    report_too_long(truncated, dropped, len(recs), c)
    return build_rows(RowBuilder(c, tokenizer.eos_token_id), pieces)


def rows(recs, tokenizer, c, labels=None) -> dict[str, np.ndarray]:
    if c.format == "text":
        return text_rows(recs, tokenizer, c.seq_len, c.text_field)
    if c.format == "classification":
        from jaxtune.data.classify import classification_rows

        return classification_rows(recs, tokenizer, c, labels)
    return example_rows(recs, tokenizer, c)


def size(rows) -> int:
    """Rows in a dict of arrays or a prepared set (:class:`.shards.PreparedRows`)."""
    return len(next(iter(rows.values()))) if isinstance(rows, dict) else len(rows)


def held_out(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (kept, held-out) indices of ``n`` items: a seeded ``fraction`` of them (at least one)
    held out. ``jaxtune.prepare`` holds out the same ones."""
    order = np.random.default_rng(seed).permutation(n)
    held = max(1, int(round(n * fraction)))
    return np.sort(order[held:]), np.sort(order[:held])


def _held_out(recs, tokenizer, c, seed: int, labels=None) -> tuple[dict, dict | None]:
    """(train rows, held-out rows) of one source's records, holding out ``c.eval_fraction`` of the
    records (of the rows, for a single text document)."""
    if not c.eval_fraction:
        return rows(recs, tokenizer, c, labels), None
    if c.format == "text" and len(recs) < 2:
        all_rows = rows(recs, tokenizer, c)
        kept, held = held_out(size(all_rows), c.eval_fraction, seed)
        return take(all_rows, kept), take(all_rows, held)
    kept, held = held_out(len(recs), c.eval_fraction, seed)
    return rows([recs[i] for i in kept], tokenizer, c, labels), rows(
        [recs[i] for i in held], tokenizer, c, labels
    )


def concat(parts: list[dict]) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary, merges and normalisation (its whole serialised form)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(vocab.encode()).hexdigest()[:24]


def _cache_key(c, tokenizer, seed: int, labels) -> str:
    """What the rows depend on: the data config, the seed (the held-out split), the tokenizer and chat
    template, and each source's fingerprint (:func:`.sources.fingerprint`: a file's size and time, a
    TFDS version, a Hugging Face dataset's fingerprint)."""
    found = [fingerprint(s, c.split, c.data_dir) for s in expand(c.train, "data.train")]
    found += [fingerprint(s, c.eval_split, c.data_dir) for s in expand(c.eval, "data.eval")] if c.eval else []
    blob = json.dumps(
        [c.to_dict(), seed, found, getattr(tokenizer, "chat_template", None), labels], default=str
    )
    return hashlib.sha256((blob + tokenizer_fingerprint(tokenizer)).encode()).hexdigest()[:24]


def load(c, tokenizer, seed: int, labels=None) -> tuple[list[dict], dict | None]:
    """(train rows, one dict per mixture component; eval rows or None) for a run's ``config.data``.

    With ``data.weights`` each source in ``data.train`` is a mixture component sampled with its weight;
    without, all sources form one. With ``data.cache_dir`` the rows are kept there (a .npz named by
    everything they depend on) and read back on the next run instead of tokenizing again.
    ``labels`` (label names by id, from :func:`jaxtune.data.classify.label_map`) for classification.
    """
    if c.train.startswith("prepared:"):
        return load_prepared(c, tokenizer, labels)
    if not c.cache_dir or c.eval.startswith("prepared:"):  # prepared rows are on disk already
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


def load_eval(c, tokenizer, labels=None):
    """The eval rows of ``data.eval`` alone (a streaming run: its training rows are not loaded)."""
    if not c.eval:
        return None
    if c.eval.startswith("prepared:"):
        return _prepared_eval(c.eval, c, tokenizer)
    return rows(records(c.eval, "data.eval", c.eval_split, c.data_dir), tokenizer, c, labels)


def _load(c, tokenizer, seed: int, labels=None) -> tuple[list[dict], dict | None]:
    parts, held = [], []
    for recs in train_groups(c):
        train_rows, held_rows = _held_out(recs, tokenizer, c, seed, labels)
        parts.append(train_rows)
        held += [held_rows] if held_rows is not None else []
    if c.eval:
        return parts, load_eval(c, tokenizer, labels)
    return parts, concat(held) if held else None


def load_prepared(c, tokenizer, labels=None):
    """:func:`load` of ``data.train = "prepared:DIR[,prepared:DIR2...]"``: the prepared parts, read by
    row from their shards (one part per training group, or all in one pool without ``data.weights``);
    eval rows from ``data.eval`` (raw sources, tokenized in memory, or ``prepared:DIR``'s eval rows),
    else the first folder's eval rows."""
    from jaxtune.data import shards

    specs = [s.strip() for s in c.train.split(",") if s.strip()]
    if not all(s.startswith("prepared:") for s in specs):
        raise DataError(
            f"config key data.train = {c.train!r} mixes prepared:DIR with raw sources; prepare them together"
        )
    folders = [_open_index(spec, c, tokenizer) for spec in specs]
    groups = [(f, i, p) for f, i in folders for p in i["parts"]]
    if not c.weights and any(i["weights"] for _, i in folders):
        log.info(
            "%s was prepared with data.weights (rows cut per source); without weights its %d parts train "
            "as one pool",
            c.train,
            len(groups),
        )
    if c.weights and len(c.weights) != len(groups):
        raise DataError(
            f"data.weights has {len(c.weights)} weights but the prepared data {c.train!r} has {len(groups)} "
            "parts (one per source prepared with weights); give one weight per part"
        )
    if c.weights:
        parts = [shards.open_part(f, i, p) for f, i, p in groups]
    else:
        folder, index = folders[0]
        every = [
            dict(s, file=os.path.relpath(os.path.join(f, s["file"]), folder))
            for f, _, p in groups
            for s in p["shards"]
        ]
        parts = [shards.open_part(folder, index, {"shards": every})]
    if c.eval:
        return parts, load_eval(c, tokenizer, labels)
    folder, index = folders[0]
    return parts, shards.open_part(folder, index, index["eval"]) if index["eval"] else None


def _open_index(spec: str, c, tokenizer) -> tuple[str, dict]:
    """(folder, index) of ``prepared:DIR``, checked against the config and the tokenizer."""
    from jaxtune.data import shards

    folder = os.path.expanduser(spec[len("prepared:") :])
    index = shards.read_index(folder)
    shards.check(
        index, folder, c, tokenizer_fingerprint(tokenizer), getattr(tokenizer, "chat_template", None)
    )
    return folder, index


def _prepared_eval(spec: str, c, tokenizer):
    """The eval rows of a prepared folder (``data.eval = "prepared:DIR"``)."""
    from jaxtune.data import shards

    folder, index = _open_index(spec, c, tokenizer)
    if not index["eval"]:
        raise DataError(
            f"{folder}: holds no eval rows; prepare it with data.eval or data.eval_fraction, "
            "or change data.eval"
        )
    return shards.open_part(folder, index, index["eval"])


def take(rows, index) -> dict:
    """The rows at ``index`` of a dict of arrays or of a prepared set, as a dict of arrays."""
    return {k: v[index] for k, v in rows.items()} if isinstance(rows, dict) else rows.take(index)


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
