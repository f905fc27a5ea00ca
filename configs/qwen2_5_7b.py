"""Full fine-tuning of Qwen2.5-7B on one v6e-8 host (8 chips of 32 GiB).

    python -m jaxtune.train --config configs/qwen2_5_7b.py --config.data.train=DATA.txt --workdir DIR

Planned (``python -m jaxtune.plan --config configs/qwen2_5_7b.py --topology v6e-8
--config.model.path=qwen2.5-7b``; numbers in configs/README.md): 7.6B parameters with AdamW state are
10.6 GiB a chip over 8-way FSDP, which leaves about 20 GiB for activations: every layer
rematerialised and the 128 x 4096-token batch in 16 micro-batches of one row a chip (31 GiB of 32).
Qwen2.5's 152k vocabulary makes the output layer large: the loss runs in chunks of 2048 tokens.
"""

from jaxtune.config import accelerator_defaults


def get_config(arg=None):
    c = accelerator_defaults()
    c.model.path = "Qwen/Qwen2.5-7B"
    c.model.remat = "full"
    c.model.loss_chunk_tokens = 2048
    c.data.train = arg or "data/train/*.txt"
    c.data.seq_len = 4096
    c.train.batch_size = 128
    c.train.grad_accum_steps = 16
    c.train.max_steps = 5_000
    c.optimizer.lr = 1e-5
    return c.lock()
