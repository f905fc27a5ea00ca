"""Tiny training runs shared by the engine and fault tests: a text corpus, a config of the llama-tiny
preset on it, and the rows of a run's metrics.jsonl."""

import json
import os

import jax

from jaxtune.config import defaults

TEXT = "".join(
    f"Line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13} times.\n" for i in range(300)
)


def one_device() -> list:
    """The first device alone, for a real model's run whose subject is not sharding: the tests' 8 host
    devices share 2 cores, and a step over all of them costs several times a one-device step (MiniLM
    at 16 x 16 tokens: 1.4 s against 0.27 s), which is also how `make demo` runs on a CPU."""
    return jax.devices()[:1]


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


def write_labelled(path, n: int) -> str:
    """``n`` records of two separable classes (pos / neg words), for the tiny classifier runs."""
    import numpy as np

    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for i in range(n):
            good = bool(rng.random() < 0.5)
            text = ("good fine nice " if good else "awful bad poor ") * 2 + str(i)
            f.write(json.dumps({"text": text, "label": "pos" if good else "neg"}) + "\n")
    return str(path)


def metrics(workdir, split="train"):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [row for row in map(json.loads, f) if row["split"] == split]


def losses(workdir):
    return {row["step"]: row["loss"] for row in metrics(workdir)}
