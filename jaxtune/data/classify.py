"""Labelled examples -> classification rows: token ids (a text, or a text pair), attention mask, token
types, and the label in the form the problem type needs.

The label space comes from the training split alone and is then fixed: the run stores it as the
model's id2label and problem_type, so the checkpoint and the export carry it.

- single-label classification: one name (or integer) per record; names sorted, numerically when they
  are all integers; a label id per row.
- multi-label classification: a list of names per record (JSON lists); the sorted union of the names;
  a 0/1 vector per row.
- regression: a number per record, with at least one that is not an integer (otherwise they are class
  ids); the value per row (``model.problem_type = "regression"`` forces it for integer scores).

A label at eval time that training never saw is an error naming its record.
"""

from __future__ import annotations

import logging

import numpy as np

from jaxtune.data.sources import DataError
from jaxtune.models import heads

log = logging.getLogger(__name__)

SINGLE, MULTI, REGRESSION = heads.SINGLE_LABEL, heads.MULTI_LABEL, heads.REGRESSION
Labels = heads.Labels  # the one label-space type, shared with the models' tasks


def _raw(record: dict, field: str, origin: str):
    value = record.get(field)
    if value is None or (not isinstance(value, list) and str(value).strip() == ""):
        raise DataError(f"{origin}: no label in field {field!r}; set data.label_field or fix the record")
    return value


def label_of(record: dict, field: str, origin: str) -> str:
    """A single label, as a name."""
    return str(_raw(record, field, origin)).strip()


def _number(value, origin: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DataError(f"{origin}: label {value!r} is not a number, as a regression needs") from None


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, bool)


def problem_type(recs, field: str = "label") -> str:
    """What the training labels say: lists -> multi-label; numbers not all integers -> regression;
    otherwise single-label."""
    values = [_raw(r, field, origin) for r, origin in recs]
    lists = [isinstance(v, list) for v in values]
    if any(lists):
        if not all(lists):
            record, origin = recs[lists.index(False)]
            raise DataError(
                f"{origin}: label {record[field]!r} is not a list, but other records have lists of labels "
                "(multi-label); make every label a list"
            )
        return MULTI
    if all(_is_number(v) for v in values) and any(not float(v).is_integer() for v in values):
        return REGRESSION
    return SINGLE


def label_map(recs, field: str = "label", kind: str = "") -> heads.Labels:
    """The label space of the training records (``kind``: a problem type, or "" to infer it)."""
    kind = kind or problem_type(recs, field)
    if kind == REGRESSION:
        for r, origin in recs:
            _number(_raw(r, field, origin), origin)
        return heads.ONE_VALUE
    if kind == MULTI:
        names = set()
        for r, origin in recs:
            value = _raw(r, field, origin)
            names.update(str(x).strip() for x in (value if isinstance(value, list) else [value]))
    else:
        names = {label_of(r, field, origin) for r, origin in recs}
    if not names:
        raise DataError(f"the training data have no labels in field {field!r}; add labelled records")
    numeric = all(n.lstrip("-").isdigit() for n in names)
    return heads.Labels(tuple(sorted(names, key=int) if numeric else sorted(names)), kind)


def target_of(field: str, labels: heads.Labels):
    """``record, origin -> label`` as the rows keep it: an id, a 0/1 vector or a value."""
    ids = {name: i for i, name in enumerate(labels.names)}

    def known(name, origin):
        if name not in ids:
            raise DataError(
                f"{origin}: label {name!r} is not among the training labels {list(labels.names)}; "
                "fix the record or add examples of it to the training data"
            )
        return ids[name]

    def target(record, origin):
        if labels.problem_type == REGRESSION:
            return _number(_raw(record, field, origin), origin)
        if labels.problem_type == MULTI:
            value = _raw(record, field, origin)
            hot = np.zeros(len(ids), np.float32)
            for name in value if isinstance(value, list) else [value]:
                hot[known(str(name).strip(), origin)] = 1.0
            return hot
        return known(label_of(record, field, origin), origin)

    return target


def classification_rows(recs, tokenizer, c, labels: heads.Labels) -> dict[str, np.ndarray]:
    """Rows of ``c.seq_len`` tokens (truncated ones are counted in the log) and their labels."""
    target = target_of(c.label_field, labels)
    texts, pairs, targets = [], [], []
    for record, origin in recs:
        for field in (c.text_field, c.text_pair_field):
            if field and not isinstance(record.get(field), str):
                raise DataError(
                    f"{origin}: no text in field {field!r}; set data.text_field / data.text_pair_field"
                )
        targets.append(target(record, origin))
        texts.append(record[c.text_field])
        pairs.append(record[c.text_pair_field] if c.text_pair_field else None)
    targets = np.asarray(targets, np.int32 if labels.problem_type == SINGLE else np.float32)
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
    # Right padding: a row's tokens are its first attention_mask.sum() positions, so a batch can be cut
    # to its longest row (data.pad_to_multiple_of) without losing any.
    enc = tokenizer(
        *args,
        truncation=True,
        max_length=c.seq_len,
        padding="max_length",
        padding_side="right",
        return_tensors="np",
    )
    out = {
        "input_ids": enc["input_ids"].astype(np.int32),
        "attention_mask": enc["attention_mask"].astype(np.int32),
        "labels": targets,
        "weights": np.ones(len(targets), np.float32),  # 0 marks the padding rows of an eval batch
    }
    if "token_type_ids" in enc:
        out["token_type_ids"] = enc["token_type_ids"].astype(np.int32)
    return out
