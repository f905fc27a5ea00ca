"""Supervised fine-tuning of SmolLM2-135M-Instruct on an Alpaca-style file (instruction / input / output).

    python -m jaxtune.train --config configs/sft_alpaca.py[:PATH.json] --workdir runs/sft_alpaca

PATH defaults to the Alpaca subset in ../shared/data/alpaca beside the repository. Each record becomes
a user turn (the instruction, then the input if any) and an assistant turn (the output), rendered with
the model's chat template; the loss is on the assistant's tokens only. Examples are packed several to a
row of 512 tokens (attention and positions stay per example); 5% of the records are held out.
"""

import os

from jaxtune import assets
from jaxtune.config import defaults

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")


def get_config(arg=None):
    c = defaults()
    c.model.path = assets.smollm2_gguf()
    c.data.train = arg or os.path.normpath(os.path.join(SHARED, "alpaca", "alpaca_data_first1727.json"))
    c.data.format = "instruction"
    c.data.seq_len = 512
    c.data.packing = True
    c.data.eval_fraction = 0.05
    c.train.batch_size = 8
    # Recompute each layer in the backward pass instead of storing its activations: on a 2-core CPU
    # (2026-12-01) a SmolLM2 step of 8 x 512 took 21.4 s with it against 24.1 s without, in 4.2 GB
    # against 11.7 GB (benchmarks/README.md). On an accelerator with the memory to spare, "none" is
    # about a third less compute.
    c.model.remat = "full"
    c.train.num_epochs = 1
    c.optimizer.lr = 5e-5
    c.optimizer.warmup_steps = 10
    c.optimizer.weight_decay = 0.01
    c.eval.every_steps = 50
    c.eval.at_start = True
    c.checkpoint.every_steps = 50
    c.sample.prompts = ("Give three tips for staying healthy.",)
    c.sample.max_new_tokens = 64
    c.export.at_end = True
    return c.lock()
