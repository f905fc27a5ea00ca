"""Evaluate a classifier on labelled data and print a metrics table.

    python -m jaxtune.evaluate (--checkpoint WORKDIR[/checkpoints/STEP] | --model HF_DIR) --data FILE
        [--text-field text] [--text-pair-field ...] [--label-field label] [--output metrics.json]

FILE is any source the training data can be (.jsonl, .json, .csv, .tsv, .parquet, tfds:, hf:). Labels
are mapped through the model's own id2label; a label the model does not know is an error naming the
record. Prints accuracy, precision / recall / F1 (macro, micro, per class), MCC and the confusion matrix.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from jaxtune import metrics
from jaxtune.data import sources
from jaxtune.data.classify import label_of


def evaluate(model, tokenizer, records, text_field="text", pair_field="", label_field="label", **kw) -> dict:
    """Metrics of ``model`` on ``records`` (``(record, origin)`` pairs)."""
    from jaxtune.predict import predict

    names = model.task.labels
    ids = {n: i for i, n in enumerate(names)}
    texts, labels = [], []
    for record, origin in records:
        name = label_of(record, label_field, origin)
        if name not in ids:
            raise sources.DataError(
                f"{origin}: label {name!r} is not one of the model's labels {list(names)}"
            )
        if not isinstance(record.get(text_field), str):
            raise sources.DataError(f"{origin}: no text in field {text_field!r}; set --text-field")
        text = record[text_field]
        texts.append((text, record[pair_field]) if pair_field else text)
        labels.append(ids[name])
    rows = predict(model, tokenizer, texts, **kw)
    preds = [ids[r["label"]] for r in rows]
    return metrics.classification(np.asarray(labels), np.asarray(preds), names)


def table(result: dict) -> str:
    lines = [f"{k:24s} {v:.4f}" for k, v in result.items() if k != "confusion_matrix"]
    lines.append("confusion matrix (rows: true, columns: predicted):")
    lines += ["  " + " ".join(f"{x:6d}" for x in row) for row in result["confusion_matrix"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    from jaxtune.predict import add_model_arguments, load

    parser = argparse.ArgumentParser(prog="python -m jaxtune.evaluate", description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="labelled data: a file, glob, tfds:NAME or hf:NAME")
    parser.add_argument("--split", default="validation", help="split of tfds: / hf: sources")
    parser.add_argument("--text-pair-field", default="")
    parser.add_argument("--label-field", default="label")
    parser.add_argument("--output", help="write the metrics as JSON here too")
    args = parser.parse_args(argv)

    try:
        model, tokenizer = load(args)
        records = [r for s in sources.expand(args.data, "--data") for r in sources.read(s, args.split)]
        result = evaluate(
            model,
            tokenizer,
            records,
            args.text_field,
            args.text_pair_field,
            args.label_field,
            batch_size=args.batch_size,
            max_length=args.max_length,
        )
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(result))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
