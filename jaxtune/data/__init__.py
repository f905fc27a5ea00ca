"""Training data: files -> fixed-length token rows -> batches.

A row holds ``seq_len + 1`` tokens, so that it gives ``seq_len`` (input, next-token) pairs, with two
masks of the same length: ``mask`` (a real token, not padding) and ``loss`` (its prediction counts).
Formats: ``text`` (documents tokenized with EOS appended, concatenated and cut into rows) and
``chatterbot`` (dialog YAML: each conversation rendered with the tokenizer's chat template, the loss
on the assistant's turns only).
"""

from __future__ import annotations

import glob
import logging
import os

import numpy as np

log = logging.getLogger(__name__)


def files(spec: str, key: str) -> list[str]:
    """The files of a ``data.train`` / ``data.eval`` value: paths or globs, comma-separated."""
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        found = sorted(glob.glob(os.path.expanduser(part)))
        if not found:
            raise FileNotFoundError(f"config key {key}: {part!r} matches no file; check the path")
        out += [f for f in found if os.path.isfile(f)]
    return out


def _rows(pieces, seq_len: int) -> dict[str, np.ndarray]:
    """Stack (tokens, loss) pieces of at most seq_len + 1 tokens into padded rows."""
    n = len(pieces)
    tokens = np.zeros((n, seq_len + 1), np.int32)
    mask = np.zeros((n, seq_len + 1), np.int8)
    loss = np.zeros((n, seq_len + 1), np.int8)
    for i, (ids, on) in enumerate(pieces):
        tokens[i, : len(ids)] = ids
        mask[i, : len(ids)] = 1
        loss[i, : len(ids)] = on
    return {"tokens": tokens, "mask": mask, "loss": loss}


def text_rows(paths: list[str], tokenizer, seq_len: int) -> dict[str, np.ndarray]:
    """Each file a document, EOS after each; the stream is cut into rows overlapping by one token so
    every token after the first is a target exactly once. The last row is padded, not dropped."""
    eos = tokenizer.eos_token_id
    stream = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not text.strip():
            raise ValueError(f"{path}: the file is empty; remove it from the data or give it text")
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
    pieces = []
    for start in range(0, max(len(stream) - 1, 1), seq_len):
        ids = stream[start : start + seq_len + 1]
        pieces.append((ids, np.ones(len(ids), np.int8)))
    return _rows(pieces, seq_len)


def chatterbot_conversations(paths: list[str]) -> list[list[str]]:
    """Conversations (alternating user / assistant utterances) from chatterbot-corpus YAML files."""
    import yaml

    out, skipped = [], []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
        if not isinstance(doc, dict) or not isinstance(doc.get("conversations"), list):
            raise ValueError(f"{path}: not a chatterbot dialog file (no 'conversations' list)")
        for i, conv in enumerate(doc["conversations"]):
            if isinstance(conv, list) and len(conv) >= 2 and all(isinstance(u, str) for u in conv):
                out.append(conv)
            else:
                skipped.append(f"{os.path.basename(path)} #{i}")
    if skipped:
        # The published corpus has a few malformed entries (a bare string where a dialog should be).
        log.warning(
            "skipped %d conversation(s) that are not lists of two or more strings: %s",
            len(skipped),
            ", ".join(skipped),
        )
    if not out:
        raise ValueError(f"{', '.join(paths)}: no conversations found")
    return out


def chat_tokens(tokenizer, messages: list[dict]) -> tuple[list[int], np.ndarray]:
    """Token ids of a conversation rendered with the chat template, and 1 on the assistant's tokens
    (its text and the end-of-turn marker), found through the rendered prefix before each reply."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        if not (text.startswith(upto) and upto.startswith(before)):
            raise ValueError(
                "the chat template does not render conversations prefix by prefix; loss masking needs it"
            )
        spans.append((len(before), len(upto)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    on = np.array([any(a <= s < b for a, b in spans) for s, _ in enc["offset_mapping"]], np.int8)
    return enc["input_ids"], on


def chat_rows(paths: list[str], tokenizer, seq_len: int) -> dict[str, np.ndarray]:
    pieces, truncated = [], 0
    for conv in chatterbot_conversations(paths):
        roles = ("user", "assistant")
        messages = [{"role": roles[i % 2], "content": u} for i, u in enumerate(conv)]
        ids, on = chat_tokens(tokenizer, messages)
        if len(ids) > seq_len + 1:
            truncated += 1
            ids, on = ids[: seq_len + 1], on[: seq_len + 1]
        pieces.append((ids, on))
    if truncated:
        log.warning(
            "%d of %d conversations were longer than seq_len + 1 and were truncated", truncated, len(pieces)
        )
    return _rows(pieces, seq_len)


def load(data_config, tokenizer, seed: int) -> tuple[dict, dict | None]:
    """(train rows, eval rows or None) for a run's ``config.data``."""
    reader = text_rows if data_config.format == "text" else chat_rows
    train = reader(files(data_config.train, "data.train"), tokenizer, data_config.seq_len)
    if data_config.eval:
        return train, reader(files(data_config.eval, "data.eval"), tokenizer, data_config.seq_len)
    if data_config.eval_fraction:
        n = len(train["tokens"])
        order = np.random.default_rng(seed).permutation(n)
        held = max(1, int(round(n * data_config.eval_fraction)))
        return take(train, np.sort(order[held:])), take(train, np.sort(order[:held]))
    return train, None


def take(rows: dict, index) -> dict:
    return {k: v[index] for k, v in rows.items()}


def to_batch(rows: dict) -> dict[str, np.ndarray]:
    """Model inputs and targets from rows of seq_len + 1 tokens."""
    tokens, mask, loss = rows["tokens"], rows["mask"], rows["loss"]
    return {
        "input_ids": tokens[:, :-1],
        "attention_mask": mask[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:],
        "loss_mask": (loss[:, 1:] * mask[:, 1:] * mask[:, :-1]).astype(np.float32),
    }
