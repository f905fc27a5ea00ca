"""Labelled examples -> classification rows: token ids (a text, or a text pair), attention mask, token
types, and a label id through a label map.

The label map is built from the training split alone (labels sorted, numerically when they all are
integers) and is then fixed: the run stores it as the model's id2label, so the checkpoint and the
export carry it. A label at eval time that training never saw is an error naming its record.
"""

from __future__ import annotations

import logging

import numpy as np

from jaxtune.data.sources import DataError

log = logging.getLogger(__name__)


def label_of(record: dict, field: str, origin: str) -> str:
    if field not in record or record[field] is None or str(record[field]).strip() == "":
        raise DataError(f"{origin}: no label in field {field!r}; set data.label_field or fix the record")
    return str(record[field]).strip()


def label_map(recs, field: str = "label") -> tuple[str, ...]:
    """Label names by id, from the training records."""
    names = {label_of(r, field, origin) for r, origin in recs}
    numeric = all(n.lstrip("-").isdigit() for n in names)
    return tuple(sorted(names, key=int) if numeric else sorted(names))


def classification_rows(recs, tokenizer, c, labels: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Rows of ``c.seq_len`` tokens (truncated ones are counted in the log) and label ids."""
    ids_of = {name: i for i, name in enumerate(labels)}
    texts, pairs, label_ids = [], [], []
    for record, origin in recs:
        for field in (c.text_field, c.text_pair_field):
            if field and not isinstance(record.get(field), str):
                raise DataError(
                    f"{origin}: no text in field {field!r}; set data.text_field / data.text_pair_field"
                )
        name = label_of(record, c.label_field, origin)
        if name not in ids_of:
            raise DataError(
                f"{origin}: label {name!r} is not among the training labels {list(labels)}; "
                "fix the record or add examples of it to the training data"
            )
        texts.append(record[c.text_field])
        pairs.append(record[c.text_pair_field] if c.text_pair_field else None)
        label_ids.append(ids_of[name])
    args = (texts, pairs) if c.text_pair_field else (texts,)
    full = tokenizer(*args)["input_ids"]
    truncated = sum(len(x) > c.seq_len for x in full)
    if truncated:
        log.warning(
            "%d of %d examples were longer than seq_len = %d tokens and were truncated",
            truncated,
            len(full),
            c.seq_len,
        )
    enc = tokenizer(*args, truncation=True, max_length=c.seq_len, padding="max_length", return_tensors="np")
    out = {
        "input_ids": enc["input_ids"].astype(np.int32),
        "attention_mask": enc["attention_mask"].astype(np.int32),
        "labels": np.asarray(label_ids, np.int32),
        "weights": np.ones(len(label_ids), np.float32),  # 0 marks the padding rows of an eval batch
    }
    if "token_type_ids" in enc:
        out["token_type_ids"] = enc["token_type_ids"].astype(np.int32)
    return out
