"""LoRA SFT of SmolLM2-135M-Instruct on an Alpaca-style file (instruction / input / output).

    python -m jaxtune.train --config configs/lora_sft.py[:PATH.json] --workdir runs/lora_sft

configs/sft_alpaca.py's recipe, read from that file: PATH defaults to the Alpaca subset in
../shared/data/alpaca beside the repository; records are rendered with the model's chat template (loss
on the responses) and packed several to a row of 512 tokens. Rank-16 adapters sit beside every
attention and MLP projection (PEFT's "all linear"), alpha 32, at a learning rate 20x the full
fine-tune's, as LoRA wants. Only the adapters train, and only they have optimizer state; the 135M
base stays frozen, bit for bit. At the end the merged model goes to runs/lora_sft/export/; the
adapters alone, as a PEFT directory:

    python -m jaxtune.export --checkpoint runs/lora_sft --out runs/lora_sft/adapter --adapter
"""

import os

from jaxtune.cli import load_config

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
    # configs/sft_alpaca.py's recipe (data, packing, schedule, evals, sample, export) with adapters.
    c = load_config(os.path.join(HERE, "sft_alpaca.py") + (f":{arg}" if arg else ""), [])
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.targets = r"attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj"
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 0.0
    return c
