"""Smoke run: a tiny random Llama (preset llama-tiny, byte tokenizer) trained on a text file.

    python -m jaxtune.train --config configs/smoke.py --workdir runs/smoke \
        [--config.data.train=PATH.txt]

Under a minute on a 2-core CPU. Without data.train it trains on the repository's README.md.
"""

import os

from jaxtune.config import defaults


def get_config(arg=None):
    c = defaults()
    c.model.path = "llama-tiny"
    c.model.tokenizer = "bytes"
    c.data.train = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    c.data.eval_fraction = 0.1
    c.data.seq_len = 64
    c.train.batch_size = 8
    c.train.max_steps = 30
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 5
    c.eval.every_steps = 10
    c.checkpoint.every_steps = 10
    return c.lock()
