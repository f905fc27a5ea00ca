"""Continued pre-training of SmolLM2-135M on a plain text file (tiny Shakespeare by default).

    python -m jaxtune.train --config configs/pretrain_text.py[:PATH.txt] --workdir runs/pretrain_text

PATH defaults to ../shared/data/tiny_shakespeare/input.txt beside the repository. The text is
tokenized with EOS at the end of each file, concatenated and cut into rows of 256 tokens; 5% of the
rows are held out for the eval loss and perplexity.
"""

import os

from jaxtune import assets
from jaxtune.config import defaults

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")


def get_config(arg=None):
    c = defaults()
    c.model.path = assets.smollm2_gguf()
    c.data.train = arg or os.path.normpath(os.path.join(SHARED, "tiny_shakespeare", "input.txt"))
    c.data.format = "text"
    c.data.seq_len = 256
    c.data.eval_fraction = 0.05
    c.train.batch_size = 8
    c.train.max_steps = 200
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 20
    c.optimizer.weight_decay = 0.01
    c.eval.every_steps = 50
    c.eval.max_batches = 8
    c.eval.at_start = True
    c.checkpoint.every_steps = 50
    return c.lock()
