"""Pre-training a small Llama (preset llama-small, ~16M parameters, SmolLM2's tokenizer) from scratch on
tiny Shakespeare, from prepared shards. Two commands: prepare the rows once, then train from them.

    python -m jaxtune.prepare --config configs/pretrain_scratch.py --out runs/shakespeare_rows
    python -m jaxtune.train --config configs/pretrain_scratch.py:runs/shakespeare_rows \
        --workdir runs/pretrain_scratch

Without an argument the config names the raw text (../shared/data/tiny_shakespeare/input.txt beside
the repository, or ``--config.data.train=FILES``) and holds out 5% of its rows for evaluation: that is
what ``jaxtune.prepare`` reads. With the prepared folder as its argument, training reads the rows from
the shards (a global shuffle, memory independent of the corpus) and evaluates on the held-out rows
prepared with them. Measured on 2 Intel Xeon cores (2026-12-01): 1.38 s a step (7.4 minutes in all,
2.5 GB peak RSS); the training loss falls from 10.8 (uniform over the vocabulary) to 4.9 and the eval
loss to 5.08 (perplexity 162) in the 300 steps.
"""

import os

from jaxtune import assets
from jaxtune.config import defaults

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")


def get_config(arg=None):
    c = defaults()
    c.model.path = "llama-small"
    c.model.tokenizer = assets.smollm2_gguf()
    if arg:
        c.data.train = f"prepared:{arg}"
    else:
        c.data.train = os.path.normpath(os.path.join(SHARED, "tiny_shakespeare", "input.txt"))
        c.data.eval_fraction = 0.05
    c.data.format = "text"
    c.data.seq_len = 256
    c.train.batch_size = 8
    c.train.max_steps = 300
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 30
    c.optimizer.weight_decay = 0.1
    c.eval.every_steps = 100
    c.eval.max_batches = 8
    c.checkpoint.every_steps = 100
    return c.lock()
