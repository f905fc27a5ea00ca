"""Continued pre-training of Llama-3 8B on a TPU pod slice (or a multi-GPU host).

    python -m jaxtune.train --config configs/llama3_8b.py --config.data.train=DATA.txt --workdir DIR

The checkpoint comes from the hub (``meta-llama/Meta-Llama-3-8B``, gated: log in first) or a local
directory via --config.model.path. Parameters and Adam state are sharded over every device (FSDP:
8B x 16 bytes = 128 GB of state, 8 GB a chip on 16 chips); bfloat16 compute on float32 master weights;
each layer rematerialised except its matmul outputs. Global batch 256 x 2048 tokens.
"""

from jaxtune.config import accelerator_defaults


def get_config(arg=None):
    c = accelerator_defaults()
    c.model.path = "meta-llama/Meta-Llama-3-8B"
    c.model.loss_chunk_tokens = 4096  # float32 logits of 4096 tokens x 128k vocab: 2 GB at a time
    c.data.train = arg or "data/train/*.txt"
    c.data.seq_len = 2048
    c.train.batch_size = 256
    c.train.max_steps = 10_000
    c.optimizer.lr = 3e-5
    c.optimizer.warmup_steps = 200
    return c.lock()
