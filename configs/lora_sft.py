"""LoRA SFT of SmolLM2-135M-Instruct on an Alpaca-style file (instruction / input / output).

    python -m jaxtune.train --config configs/lora_sft.py[:PATH.json] --workdir runs/lora_sft

PATH defaults to the Alpaca subset in ../shared/data/alpaca beside the repository; records are
rendered with the model's chat template (loss on the responses) and packed several to a row of 512
tokens. Rank-16 adapters sit beside every attention and MLP projection (PEFT's "all linear"), alpha
32, at a learning rate 20x the full fine-tune's (configs/sft_alpaca.py), as LoRA wants. Only the
adapters train, and only they have optimizer state; the 135M base stays frozen, bit for bit. At the
end the merged model goes to runs/lora_sft/export/; the adapters alone, as a PEFT directory:

    python -m jaxtune.export --checkpoint runs/lora_sft --out runs/lora_sft/adapter --adapter
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
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.targets = r"attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj"
    c.train.batch_size = 8
    c.train.num_epochs = 1
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 10
    c.eval.every_steps = 50
    c.eval.at_start = True
    c.checkpoint.every_steps = 50
    c.sample.prompts = ("Give three tips for staying healthy.",)
    c.sample.max_new_tokens = 64
    c.export.at_end = True
    return c.lock()
