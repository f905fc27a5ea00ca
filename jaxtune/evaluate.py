"""Evaluate a classifier on labelled data and print a metrics table.

    python -m jaxtune.evaluate (--checkpoint WORKDIR[/checkpoints/STEP] | --model HF_DIR) --data FILE
        [--text-field text] [--text-pair-field ...] [--label-field label] [--metric pkg.module:fn]
        [--output metrics.json] [--plot confusion.png]

FILE is any source the training data can be (.jsonl, .json, .csv, .tsv, .parquet, tfds:, hf:). Labels
are mapped through the model's own id2label; a label the model does not know is an error naming the
record. Prints, by the model's problem type: accuracy, precision / recall / F1 (macro, micro, per
class), MCC and the confusion matrix; exact match and F1 (multi-label); MSE, Pearson and Spearman
(regression).
"""

from __future__ import annotations

import json
import sys

import numpy as np

from jaxtune import cli, metrics
from jaxtune.data import classify, sources


def evaluate(
    model, tokenizer, records, text_field="text", pair_field="", label_field="label", extra=(), **kw
) -> dict:
    """Metrics of ``model`` on ``records`` (``(record, origin)`` pairs), by the model's problem type;
    ``extra``: user metric functions (see :func:`jaxtune.metrics.user_metric`)."""
    from jaxtune.models import heads
    from jaxtune.predict import logits_of

    kind = model.task.problem_type
    target = classify.target_of(label_field, model.task.space)
    texts, gold = [], []
    for record, origin in records:
        if not isinstance(record.get(text_field), str):
            raise sources.DataError(f"{origin}: no text in field {text_field!r}; set --text-field")
        gold.append(target(record, origin))
        text = record[text_field]
        texts.append((text, record[pair_field]) if pair_field else text)
    preds = heads.predictions(logits_of(model, tokenizer, texts, **kw), kind)
    return metrics.for_problem(kind, gold, list(np.asarray(preds)), model.task.labels, extra)


def table(result: dict) -> str:
    lines = [f"{k:24s} {v:.4f}" for k, v in result.items() if k != "confusion_matrix"]
    if "confusion_matrix" in result:
        lines.append("confusion matrix (rows: true, columns: predicted):")
        lines += ["  " + " ".join(f"{x:6d}" for x in row) for row in result["confusion_matrix"]]
    return "\n".join(lines)


def run(args) -> None:
    from jaxtune.predict import check_arguments, load

    check_arguments(args, [("--output", args.output), ("--plot", args.plot)])
    model, tokenizer = load(args)
    records = [r for s in sources.expand(args.data, "--data") for r in sources.read(s, args.split)]
    result = evaluate(
        model,
        tokenizer,
        records,
        args.text_field,
        args.text_pair_field,
        args.label_field,
        metrics.user_metrics(",".join(args.metric)),
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    from jaxtune.distributed import is_main

    if not is_main():  # every process evaluated the same rows; process 0 reports
        return
    print(table(result))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot and "confusion_matrix" in result:
        from jaxtune.plots import confusion_png

        confusion_png(result["confusion_matrix"], model.task.labels, args.plot, args.data)


def main(argv=None) -> int:
    from jaxtune.predict import add_model_arguments

    p = cli.parser("evaluate", __doc__)
    add_model_arguments(p)
    p.add_argument("--data", required=True, help="labelled data: a file, glob, tfds:NAME or hf:NAME")
    p.add_argument("--split", default="validation", help="split of tfds: / hf: sources")
    p.add_argument("--text-pair-field", default="")
    p.add_argument("--label-field", default="label")
    p.add_argument("--metric", action="append", default=[], help="extra metric, pkg.module:fn (repeatable)")
    p.add_argument("--output", help="write the metrics as JSON here too")
    p.add_argument("--plot", help="write the confusion matrix as a PNG here")
    return cli.main(p, run, argv, multihost=True)


if __name__ == "__main__":
    sys.exit(main())
