"""Tiny training runs shared by the engine and fault tests: a text corpus, a config of the llama-tiny
preset on it, and the rows of a run's metrics.jsonl."""

import json
import os

from jaxtune.config import defaults

TEXT = "".join(
    f"Line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13} times.\n" for i in range(300)
)


def tiny_config(text_file, **changes):
    c = defaults()
    c.model.path = "llama-tiny"
    c.model.tokenizer = "bytes"
    c.data.train = text_file
    c.data.eval_fraction = 0.1
    c.data.seq_len = 32
    c.train.batch_size = 8
    c.train.max_steps = 5
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 2
    c.checkpoint.async_save = False
    for key, value in changes.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def metrics(workdir, split="train"):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [row for row in map(json.loads, f) if row["split"] == split]


def losses(workdir):
    return {row["step"]: row["loss"] for row in metrics(workdir)}
