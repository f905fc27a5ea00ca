"""Evaluation metrics computed on the host from gathered predictions (numpy; no extra dependency).

- :func:`classification`: accuracy; precision, recall and F1 per class, macro and micro; Matthews
  correlation (the multi-class form); the confusion matrix (rows: true label, columns: predicted).
- :func:`regression`: mean squared error, Pearson and Spearman correlation (ties share average ranks).
- :func:`multilabel`: exact-match accuracy, micro and macro F1 at probability 0.5.
- :func:`user_metric`: a metric given by import path, ``package.module:function`` (``eval.metrics`` in
  a run's config, ``--metric`` for ``python -m jaxtune.evaluate``), called with the true and predicted
  labels: ids for single-label classification, values for regression, 0/1 matrices for multi-label.

Definitions follow scikit-learn's, including its zero-division convention (a class never predicted,
or never present, scores 0 precision or recall instead of NaN) and its default macro average over the
labels that occur in the true or predicted labels (per-label scores are reported for every label).
"""

from __future__ import annotations

import importlib

import numpy as np

from jaxtune.errors import ConfigError


def _safe_div(num, den):
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


def confusion(labels, preds, num_classes: int) -> np.ndarray:
    """Counts ``[true, predicted]``."""
    m = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(m, (np.asarray(labels), np.asarray(preds)), 1)
    return m


def classification(labels, preds, names) -> dict:
    """Metrics of single-label predictions; ``names`` are the label names by id."""
    k = len(names)
    m = confusion(labels, preds, k)
    tp = np.diag(m).astype(np.float64)
    predicted, actual = m.sum(0), m.sum(1)
    precision, recall = _safe_div(tp, predicted), _safe_div(tp, actual)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    n, correct = m.sum(), tp.sum()
    # Matthews correlation, multi-class (Gorodkin's R_K), as scikit-learn computes it.
    cov_ytyp = correct * n - np.dot(actual, predicted)
    cov_ypyp = n * n - np.dot(predicted, predicted)
    cov_ytyt = n * n - np.dot(actual, actual)
    mcc = float(_safe_div(cov_ytyp, np.sqrt(cov_ytyt * cov_ypyp)))
    # Macro averages over the labels that occur (true or predicted), as scikit-learn's default does: a
    # label absent from this eval set (a rare class, a cross-validation fold) would otherwise count as 0.
    present = (actual + predicted) > 0
    if not present.any():
        present[:] = True
    out = {
        "accuracy": float(correct / max(n, 1)),
        "precision_macro": float(precision[present].mean()),
        "recall_macro": float(recall[present].mean()),
        "f1_macro": float(f1[present].mean()),
        # Every example is one prediction, so micro precision = micro recall = micro F1 = accuracy.
        "f1_micro": float(correct / max(n, 1)),
        "mcc": mcc,
    }
    for i, name in enumerate(names):
        out[f"precision/{name}"] = float(precision[i])
        out[f"recall/{name}"] = float(recall[i])
        out[f"f1/{name}"] = float(f1[i])
    out["confusion_matrix"] = m.tolist()
    return out


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    values, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    counts = np.bincount(inverse)
    return (sums / counts)[inverse]


def _pearson(a, b) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float(_safe_div((a * b).sum(), np.sqrt((a * a).sum() * (b * b).sum())))


def regression(targets, predictions) -> dict:
    y, p = np.asarray(targets, np.float64).ravel(), np.asarray(predictions, np.float64).ravel()
    return {
        "mse": float(np.mean((y - p) ** 2)),
        "pearson": _pearson(y, p),
        "spearman": _pearson(_ranks(y), _ranks(p)),
    }


def multilabel(targets, logits) -> dict:
    """Labels ``[n, k]`` of 0/1 against logits ``[n, k]``; a label is predicted when sigmoid > 0.5."""
    y = np.asarray(targets) > 0.5
    p = np.asarray(logits) > 0.0
    tp, fp, fn = (y & p).sum(0), (~y & p).sum(0), (y & ~p).sum(0)
    f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
    return {
        "exact_match": float(np.mean(np.all(y == p, axis=1))),
        "f1_micro": float(_safe_div(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum())),
        "f1_macro": float(f1.mean()),
    }


def for_problem(problem_type: str, labels, preds, names=(), extra=()) -> dict:
    """The metrics of ``problem_type`` and the user metrics ``extra``. ``preds``: predicted ids
    (single-label; the result has the confusion matrix too), values (regression) or scores that are
    positive where a label is on (multi-label: logits)."""
    y, p = np.asarray(labels), np.asarray(preds)
    if problem_type == "regression":
        return {**regression(y, p), **user_scores(extra, y, p)}
    if problem_type == "multi_label_classification":
        return {**multilabel(y, p), **user_scores(extra, y, (p > 0).astype(np.float32))}
    return {**classification(y, p, names), **user_scores(extra, y, p)}


def user_metric(path: str):
    """The function at ``package.module:function``; it is called as ``fn(labels, predictions)`` and
    returns a number or a dict of numbers."""
    module, sep, name = path.partition(":")
    if not sep or not module or not name:
        raise ConfigError(f"metric {path!r} is not of the form package.module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"metric {path!r} cannot be imported ({e}); check the module path and name") from e
    if not callable(fn):
        raise ConfigError(f"metric {path!r} is not a function")
    return fn


def user_metrics(spec: str) -> list:
    """The functions of a comma-separated list of ``package.module:function`` paths."""
    return [user_metric(p.strip()) for p in spec.split(",") if p.strip()]


def user_scores(fns, labels, preds) -> dict:
    """Each user metric of (true, predicted) labels: a number is named after its function, a dict keeps
    its own names."""
    out = {}
    for fn in fns:
        value = fn(np.asarray(labels), np.asarray(preds))
        if isinstance(value, dict):
            out.update({str(k): float(v) for k, v in value.items()})
        else:
            out[fn.__name__] = float(value)
    return out
