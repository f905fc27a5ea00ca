"""Predict labels with a classifier.

    python -m jaxtune.predict (--checkpoint WORKDIR[/checkpoints/STEP] | --model HF_DIR)
        (--text "..." [--text "..."] | --input FILE [--text-field text]) [--output FILE.jsonl]

Writes one JSON object per input: the text, the label name (through the model's id2label) and the
probability of every label (softmax; sigmoid for multi-label; the value for regression). Inputs go
through the model in batches of a fixed size, padded to their longest text in steps of 8 tokens, so the
forward pass compiles once per length.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import jax
import numpy as np
from flax import nnx

from jaxtune import cli
from jaxtune.errors import DataError, ModelError, OutputError, UsageError
from jaxtune.models import heads


def load(args):
    """(model, tokenizer) from a training checkpoint or a Hugging Face directory."""
    from jaxtune.checkpoint import load_model

    model, tokenizer = load_model(args.checkpoint, args.model)
    if model.task.name != "sequence_classification":
        raise ModelError(f"the model is a {model.task.name} model; predict needs a sequence classifier")
    if tokenizer is None:
        where = args.checkpoint or args.model
        raise ModelError(f"{where}: no tokenizer to read the texts with; pass a model directory that has one")
    return model, tokenizer


def texts_from(args) -> list[str]:
    """The ``--text`` values, or the ``--text-field`` of every record of ``--input`` (any data file)."""
    if args.text:
        return list(args.text)
    from jaxtune.data import sources

    out = []
    for record, origin in sources.read(args.input):
        if not isinstance(record.get(args.text_field), str):
            raise DataError(f"{origin}: no text in field {args.text_field!r}; set --text-field")
        out.append(record[args.text_field])
    return out


def logits_of(model, tokenizer, texts: list, batch_size: int = 32, max_length: int = 128) -> np.ndarray:
    """The classifier's logits ``[len(texts), labels]`` (texts, or (text, pair) tuples), in batches of a
    fixed size padded to their longest text in steps of 8 tokens: a handful of shapes to compile."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, mask, types):
        return nnx.merge(graphdef, state)(ids, mask, types)

    from tqdm.auto import tqdm

    out = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="predict", unit="batch", disable=len(starts) < 4, leave=False):
        chunk = texts[start : start + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))  # a fixed batch size
        enc = tokenizer(
            padded,
            padding="longest",
            pad_to_multiple_of=8,
            truncation=True,
            max_length=max_length,
            padding_side="right",
            return_tensors="np",
        )
        types = enc.get("token_type_ids") if getattr(model.cfg, "type_vocab_size", 0) else None
        out.append(np.asarray(forward(state, enc["input_ids"], enc["attention_mask"], types))[: len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, model.task.num_labels), np.float32)


def predict(model, tokenizer, texts: list[str], batch_size: int = 32, max_length: int = 128) -> list[dict]:
    """Label names and probabilities for ``texts`` (the value or values, for regression)."""
    task = model.task
    logits = logits_of(model, tokenizer, texts, batch_size, max_length)
    if task.problem_type == heads.REGRESSION:
        return [
            {"text": t, "value": r.tolist() if len(r) > 1 else float(r[0])}
            for t, r in zip(texts, logits, strict=True)
        ]
    probs = np.asarray(heads.probabilities(logits, task.problem_type))
    picked = np.asarray(heads.predictions(logits, task.problem_type))
    out = []
    for text, p, pick in zip(texts, probs, picked, strict=True):
        if task.problem_type == heads.MULTI_LABEL:  # on above logit 0, i.e. probability 0.5
            label = [name for name, on in zip(task.labels, pick > 0, strict=True) if on]
        else:
            label = task.labels[int(pick)]
        out.append(
            {
                "text": text,
                "label": label,
                "probabilities": dict(zip(task.labels, map(float, p), strict=True)),
            }
        )
    return out


def add_model_arguments(parser) -> None:
    """The classifier to load and how to batch it: shared with ``python -m jaxtune.evaluate``."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="training run directory, or WORKDIR/checkpoints/STEP")
    source.add_argument("--model", help="Hugging Face directory of a classifier (an export, say)")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)


def check_arguments(args, outputs=()) -> None:
    """Mistakes in the flags, found before a model is loaded: sizes below 1, and output files (flag,
    path) that cannot be written, so no prediction is computed only to be lost."""
    for flag, value in (("--batch-size", args.batch_size), ("--max-length", args.max_length)):
        if value < 1:
            raise UsageError(f"{flag} {value}: must be at least 1")
    for flag, path in outputs:
        if path:
            writable(flag, path)


def writable(flag: str, path: str) -> None:
    """Raise an OutputError unless ``path`` can be written (tried with a temporary file beside it)."""
    if os.path.isdir(path):
        raise OutputError(f"{flag} {path}: a directory stands there; pass a file path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OutputError(f"{flag} {path}: the directory {folder} does not exist; create it first")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".jaxtune-write-test-"):
            pass
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise PermissionError(13, "Permission denied", path)
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot be written ({e.strerror}); choose another path") from e


def run(args) -> None:
    check_arguments(args, [("--output", args.output)])
    if args.text is not None and not all(t.strip() for t in args.text):
        raise UsageError("--text is empty; give the text to classify, or use --input FILE")
    model, tokenizer = load(args)
    rows = predict(model, tokenizer, texts_from(args), args.batch_size, args.max_length)
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    if args.output:
        with open(args.output, "w") as f:
            f.write(lines)
    else:
        sys.stdout.write(lines)


def main(argv=None) -> int:
    p = cli.parser("predict", __doc__)
    add_model_arguments(p)
    inputs = p.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--text", action="append", help="a text to classify (repeatable)")
    inputs.add_argument("--input", help="a data file (.jsonl, .json, .csv, .tsv, .parquet)")
    p.add_argument("--output", help="JSONL file to write (default: standard output)")
    return cli.main(p, run, argv)


if __name__ == "__main__":
    sys.exit(main())
