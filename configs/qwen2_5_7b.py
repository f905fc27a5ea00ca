"""Fine-tuning Qwen2.5-7B on a TPU pod slice or a multi-GPU host.

    python -m jaxtune.train --config configs/qwen2_5_7b.py --config.data.train=DATA.txt --workdir DIR

Qwen2.5's 152k vocabulary makes the output layer large: the loss runs in chunks of 2048 tokens so the
float32 logits stay at 1.2 GB. FSDP over all devices, bfloat16 compute, ``dots`` rematerialisation.
"""

from jaxtune.config import accelerator_defaults


def get_config(arg=None):
    c = accelerator_defaults()
    c.model.path = "Qwen/Qwen2.5-7B"
    c.model.loss_chunk_tokens = 2048
    c.data.train = arg or "data/train/*.txt"
    c.data.seq_len = 4096
    c.train.batch_size = 128
    c.train.max_steps = 5_000
    c.optimizer.lr = 1e-5
    return c.lock()
