"""Evaluators, by task: a language model's loss and perplexity; a classifier's loss and metrics by
problem type (with the confusion matrix as JSON and PNG, and the user's metrics of ``eval.metrics``).

An evaluator runs the plan's eval step over the held-out rows, writes its values to the metrics
writer and the log, and returns them (the best tracker reads them).
"""

from __future__ import annotations

import json
import logging
import math
import os

import jax
import numpy as np

from jaxtune import fs, metrics, plots, sharding
from jaxtune.data.loader import eval_batches

log = logging.getLogger("jaxtune.train")


def device_batch(batch: dict, shard, global_rows: int | None = None) -> dict:
    """A host batch (this process's rows: :func:`jaxtune.sharding.process_rows`) as global arrays of
    ``global_rows`` rows (default: the host batch's, one process) sharded over the batch axes."""
    out = {}
    for k, v in batch.items():
        shape = (global_rows or v.shape[0], *v.shape[1:])
        out[k] = jax.make_array_from_process_local_data(shard, v, shape)
    return out


class LossEvaluator:
    """Summed loss over the eval rows: ``loss`` and ``perplexity`` (a language model)."""

    unit = "tokens"

    def __init__(self, eval_step, rows, batch_size, max_batches, multiple, batch_sharding, writer, every):
        self.eval_step, self.rows, self.writer, self.every = eval_step, rows, writer, every
        self.batch_size, self.max_batches, self.multiple = batch_size, max_batches, multiple
        self.batch_sharding = batch_sharding

    def due(self, step: int, last: bool) -> bool:
        """An eval every ``eval.every_steps`` (the end of the run has its own)."""
        return not last and bool(self.every) and step % self.every == 0

    def __call__(self, step: int, params, frozen) -> dict:
        sums: dict[str, float] = {}
        seen, predicted = [], []
        held = sharding.process_rows(self.batch_sharding, self.batch_size)
        batches = eval_batches(self.rows, self.batch_size, self.max_batches, held, self.multiple)
        for batch in batches:
            batch = device_batch(batch, self.batch_sharding, self.batch_size)
            out = jax.device_get(self.eval_step(params, frozen, batch))
            if "predictions" in out:
                keep = out.pop("weights") > 0  # not the padding rows of the last batch
                seen.append(out.pop("labels")[keep])
                predicted.append(out.pop("predictions")[keep])
            for key, value in out.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        loss = sums["loss_sum"] / max(sums["count"], 1.0)
        if predicted:
            y, p = np.concatenate(seen), np.concatenate(predicted)
            values, count = {"loss": loss, **self.scores(step, y, p)}, len(y)
        else:
            values, count = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}, sums["count"]
        self.writer.write(step, "eval", **values)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if "/" not in k)
        log.info("eval at step %d (%d %s): %s", step, count, self.unit, shown)
        return values

    def scores(self, step: int, labels, predictions) -> dict:
        return {}


class ClassifierEvaluator(LossEvaluator):
    """A classifier's loss and metrics (:func:`jaxtune.metrics.for_problem`); single-label runs also
    write ``confusion_matrix.json`` and ``confusion_matrix.png`` in the workdir."""

    unit = "examples"

    def __init__(self, *args, labels, extra=(), workdir: str = ""):
        super().__init__(*args)
        self.labels, self.extra, self.workdir = labels, extra, workdir

    def scores(self, step: int, labels, predictions) -> dict:
        names = self.labels.names
        scores = metrics.for_problem(self.labels.problem_type, labels, predictions, names, self.extra)
        matrix = scores.pop("confusion_matrix", None)
        if matrix is not None and jax.process_index() == 0:
            record = {"step": step, "labels": list(names), "matrix": matrix}
            fs.write_text(os.path.join(self.workdir, "confusion_matrix.json"), json.dumps(record))
            with fs.staged(self.workdir) as local:  # the plot library writes local files only
                path = os.path.join(local, "confusion_matrix.png")
                plots.confusion_png(matrix, names, path, f"eval at step {step}")
        return scores


def make(config, plan, eval_rows, labels, writer, workdir: str):
    """The evaluator of a run's task, or None without eval rows."""
    if eval_rows is None:
        return None
    c = config.eval
    args = (
        plan.eval_step,
        eval_rows,
        c.batch_size or config.train.batch_size,
        c.max_batches,
        config.data.pad_to_multiple_of,
        plan.batch_sharding,
        writer,
        c.every_steps,
    )
    if plan.objective.causal:
        return LossEvaluator(*args)
    return ClassifierEvaluator(*args, labels=labels, extra=metrics.user_metrics(c.metrics), workdir=workdir)
