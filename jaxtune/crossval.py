"""K-fold cross-validation: every fold a full training run in its own workdir.

    python -m jaxtune.crossval --config configs/X.py[:arg] [--config.KEY=VALUE ...] --folds K --workdir DIR

The records of ``data.train`` (after ``data.max_train_records``) are split into K folds with
``train.seed``: stratified by label for single-label classification (every fold holds each label's
share to within one record), a seeded shuffle otherwise (regression, multi-label, language models).
Run k trains on the other K - 1 folds and evaluates on fold k; ``DIR/fold_k/`` holds its
``train.jsonl`` and ``eval.jsonl``, its checkpoints and metrics, and ``fold.json`` (its final eval
metrics: those of the best checkpoint when ``checkpoint.load_best_at_end`` brought it back).
``DIR/crossval.json`` holds every fold's metrics with their mean and standard deviation over the folds
(ddof 1), also printed as a table. A rerun on DIR skips the finished folds and resumes an interrupted
one from its checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np

from jaxtune import data
from jaxtune.config import ConfigError
from jaxtune.data import classify

log = logging.getLogger("jaxtune.crossval")


def folds(labels, k: int, seed: int) -> list[np.ndarray]:
    """The held-out indices of each of ``k`` folds of ``len(labels)`` items. With ``labels`` (a list)
    each label's items are shuffled and dealt round-robin, continuing from where the previous label
    stopped, so fold sizes and each label's count per fold differ by at most one; ``labels`` may also
    be an int (the item count) for an unstratified shuffle."""
    rng = np.random.default_rng(seed)
    if isinstance(labels, int):
        order = rng.permutation(labels)
        n = labels
    else:
        labels = np.asarray(labels)
        n = len(labels)
        order = np.concatenate([rng.permutation(np.flatnonzero(labels == y)) for y in np.unique(labels)])
    fold_of = np.empty(n, np.int64)
    fold_of[order] = np.arange(n) % k
    return [np.flatnonzero(fold_of == f) for f in range(k)]


def _write_jsonl(path: str, recs) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record, _ in recs:
            f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")


def _final_eval(workdir: str, best_step) -> dict:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if r["split"] == "eval"]
    if not evals:
        raise ConfigError(f"{workdir} has no eval metrics; a fold's run must evaluate (it has eval data)")
    pick = [r for r in evals if r["step"] == best_step] if best_step else []
    row = (pick or evals)[-1]
    return {k: v for k, v in row.items() if k != "split"}


def run(config, workdir: str, k: int) -> dict:
    """Train and evaluate ``k`` folds of ``config``'s training data under ``workdir``; returns the
    summary also written to ``workdir/crossval.json``."""
    from jaxtune import train

    c = config.data
    if k < 2:
        raise ConfigError(f"--folds {k}: cross-validation needs at least 2 folds")
    if c.weights:
        raise ConfigError(
            "config key data.weights: cross-validation splits one pool of records; remove the mixture weights"
        )
    if c.eval or c.eval_fraction:
        log.warning(
            "data.eval / data.eval_fraction are not used: each fold is evaluated on its held-out part"
        )
    recs = data.train_groups(c)[0]
    if len(recs) < k:
        raise ConfigError(f"data.train has {len(recs)} records, fewer than --folds {k}")
    kind = config.model.problem_type or (
        c.format == "classification" and classify.problem_type(recs, c.label_field)
    )
    if kind == classify.SINGLE:
        labels = [classify.label_of(r, c.label_field, origin) for r, origin in recs]
        names, counts = np.unique(labels, return_counts=True)
        single = [str(n) for n, m in zip(names, counts, strict=True) if m == 1]
        if single:
            raise ConfigError(
                f"label(s) {', '.join(map(repr, single))} have a single record in data.train: the fold that "
                "holds it out would train without that label; add examples or remove the record"
            )
        small = [f"{n!r} ({m})" for n, m in zip(names, counts, strict=True) if m < k]
        if small:
            log.warning("labels with fewer records than folds, absent from some folds: %s", ", ".join(small))
        held = folds(labels, k, config.train.seed)
    else:
        held = folds(len(recs), k, config.train.seed)
    os.makedirs(workdir, exist_ok=True)
    results = []
    for f, eval_index in enumerate(held):
        fold_dir = os.path.join(workdir, f"fold_{f}")
        done = os.path.join(fold_dir, "fold.json")
        if os.path.exists(done):
            with open(done) as fh:
                results.append(json.load(fh))
            log.info("fold %d of %d: finished before, read from %s", f + 1, k, done)
            continue
        os.makedirs(fold_dir, exist_ok=True)
        keep = np.ones(len(recs), bool)
        keep[eval_index] = False
        train_file, eval_file = os.path.join(fold_dir, "train.jsonl"), os.path.join(fold_dir, "eval.jsonl")
        _write_jsonl(train_file, [recs[i] for i in np.flatnonzero(keep)])
        _write_jsonl(eval_file, [recs[i] for i in eval_index])
        fold_config = config.copy_and_resolve_references()
        fold_config.data.train, fold_config.data.eval = train_file, eval_file
        fold_config.data.eval_fraction, fold_config.data.max_train_records = 0.0, 0
        log.info("fold %d of %d: %d training and %d eval records", f + 1, k, keep.sum(), len(eval_index))
        summary = train.run(fold_config, fold_dir)
        result = {
            "fold": f,
            "train_records": int(keep.sum()),
            "eval_records": len(eval_index),
            "metrics": _final_eval(fold_dir, summary.get("best_step")),
        }
        with open(done, "w") as fh:
            json.dump(result, fh, indent=2)
        results.append(result)
    keys = [key for key in results[0]["metrics"] if key != "step"]
    values = {key: np.asarray([r["metrics"].get(key, np.nan) for r in results], np.float64) for key in keys}
    out = {
        "folds": results,
        "mean": {key: float(np.mean(v)) for key, v in values.items()},
        "std": {key: float(np.std(v, ddof=1)) for key, v in values.items()},
    }
    with open(os.path.join(workdir, "crossval.json"), "w") as fh:
        json.dump(out, fh, indent=2)
    return out


def table(out: dict) -> str:
    k = len(out["folds"])
    head = f"{'metric':24s} {'mean':>8s}   {'std':>6s}  " + " ".join(
        f"{'fold ' + str(i):>8s}" for i in range(k)
    )
    lines = [head]
    for key, mean in out["mean"].items():
        per_fold = " ".join(f"{r['metrics'].get(key, float('nan')):8.4f}" for r in out["folds"])
        lines.append(f"{key:24s} {mean:8.4f} +- {out['std'][key]:6.4f}  {per_fold}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from absl import flags

    from jaxtune import train

    def define(flag_values):
        flags.DEFINE_integer("folds", 5, "number of folds", flag_values=flag_values)

    def body(flags_):
        print(table(run(flags_.config, flags_.workdir, flags_.folds)))

    return train.cli(argv, "jaxtune.crossval", body, define)


if __name__ == "__main__":
    sys.exit(main())
