"""K-fold cross-validation: every fold a full training run in its own workdir.

    python -m jaxtune.crossval --config configs/X.py[:arg] [--config.KEY=VALUE ...] --folds K --workdir DIR

The records of ``data.train`` (after ``data.max_train_records`` and ``data.dedupe``) are split into K
folds with ``train.seed``: stratified by label for single-label classification (every fold holds each
label's share to within one record), a seeded shuffle otherwise (regression, multi-label, language
models). Every fold gets the label space of all the records. Run k trains on the other K - 1 folds and
evaluates on fold k; ``DIR/fold_k/`` holds its ``train.jsonl`` and ``eval.jsonl``, its checkpoints and
metrics, and ``fold.json`` (its last eval: the end of the recipe, never a checkpoint picked on the fold's
own eval data; folds write no export). ``DIR/crossval.json`` holds every fold's metrics with their mean
and standard deviation over the folds (ddof 1), also printed as a table. A rerun on DIR skips the
finished folds and resumes an interrupted one from its checkpoints; ``DIR/crossval_plan.json`` makes
sure it is the same split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys

import jax
import numpy as np

from jaxtune import data, fs
from jaxtune.data import classify
from jaxtune.errors import ConfigError, UsageError
from jaxtune.workdir import Lock

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


def _last_eval(workdir: str) -> dict:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if r["split"] == "eval"]
    if not evals:
        raise ConfigError(f"{workdir} has no eval metrics; a fold's run must evaluate (it has eval data)")
    return {k: v for k, v in evals[-1].items() if k != "split"}


def _check_plan(workdir: str, plan: dict) -> None:
    """Write the split's fingerprint, or check that a rerun on ``workdir`` splits the same way (its
    finished folds and checkpoints belong to that split: another one would leak eval data)."""
    path = os.path.join(workdir, "crossval_plan.json")
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        if before != plan:
            raise ConfigError(
                f"{workdir} holds the folds of another split ({before}, now {plan}); use a new --workdir"
            )
    elif jax.process_index() == 0:
        with open(path, "w") as f:
            json.dump(plan, f)


def _sync(name: str) -> None:
    """Every process waits here (after process 0 wrote files the others read)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def run(config, workdir: str, k: int) -> dict | None:
    """Train and evaluate ``k`` folds of ``config``'s training data under ``workdir``; returns the
    summary also written to ``workdir/crossval.json``, or None when a signal stopped a fold (a rerun
    continues it)."""

    c = config.data
    if fs.is_url(workdir):  # the folds' records are files each fold's run reads as its data
        raise UsageError(
            f"--workdir {workdir}: cross-validation needs a local folder (or a mounted bucket); train "
            "runs take gs:// workdirs"
        )
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
    # One label space for every fold, from all the records: a fold's training part may lack a rare label.
    labels = None
    if c.format == "classification":
        labels = classify.label_map(recs, c.label_field, config.model.problem_type)
    if labels is not None and labels.problem_type == classify.SINGLE:
        names = [classify.label_of(r, c.label_field, origin) for r, origin in recs]
        values, counts = np.unique(names, return_counts=True)
        small = [f"{str(n)!r} ({m})" for n, m in zip(values, counts, strict=True) if m < k]
        if small:
            log.warning(
                "labels with fewer records than folds are absent from some folds' eval (and a label with "
                "one record is never trained on in the fold that holds it out): %s",
                ", ".join(small),
            )
        held = folds(names, k, config.train.seed)
    else:
        held = folds(len(recs), k, config.train.seed)
    with Lock(workdir, enabled=jax.process_index() == 0):
        return _run_folds(config, workdir, k, recs, labels, held)


def _run_folds(config, workdir: str, k: int, recs, labels, held) -> dict | None:
    from jaxtune import train

    fingerprint = hashlib.sha256(json.dumps([h.tolist() for h in held]).encode()).hexdigest()[:16]
    _check_plan(workdir, {"folds": k, "seed": config.train.seed, "records": len(recs), "split": fingerprint})
    results = []
    for f, eval_index in enumerate(held):
        fold_dir = os.path.join(workdir, f"fold_{f}")
        done = os.path.join(fold_dir, "fold.json")
        if os.path.exists(done):
            with open(done) as fh:
                results.append(json.load(fh))
            log.info("fold %d of %d: finished before, read from %s", f + 1, k, done)
            continue
        keep = np.ones(len(recs), bool)
        keep[eval_index] = False
        train_file, eval_file = os.path.join(fold_dir, "train.jsonl"), os.path.join(fold_dir, "eval.jsonl")
        if jax.process_index() == 0:
            os.makedirs(fold_dir, exist_ok=True)
            _write_jsonl(train_file, [recs[i] for i in np.flatnonzero(keep)])
            _write_jsonl(eval_file, [recs[i] for i in eval_index])
        _sync(f"crossval fold {f} files")
        fold_config = config.copy_and_resolve_references()
        fold_config.data.train, fold_config.data.eval = train_file, eval_file
        fold_config.data.eval_fraction, fold_config.data.max_train_records = 0.0, 0
        fold_config.export.at_end = False  # folds measure the recipe; train the final model on all data
        log.info("fold %d of %d: %d training and %d eval records", f + 1, k, keep.sum(), len(eval_index))
        if train.run(fold_config, fold_dir, labels=labels).get("stopped"):
            log.info("fold %d of %d stopped with a checkpoint; rerun on %s to continue", f + 1, k, workdir)
            return None
        result = {
            "fold": f,
            "train_records": int(keep.sum()),
            "eval_records": len(eval_index),
            "metrics": _last_eval(fold_dir),
        }
        if jax.process_index() == 0:
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
    if jax.process_index() == 0:
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
    from jaxtune import cli

    p = cli.parser("crossval", __doc__)
    cli.add_run_arguments(p)
    p.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")

    def body(args):
        out = run(args.config, args.workdir, args.folds)
        if out is not None:
            print(table(out))

    return cli.main(p, body, argv, with_config=True, multihost=True, trains=True)


if __name__ == "__main__":
    sys.exit(main())
