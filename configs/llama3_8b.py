"""Full fine-tuning (or continued pre-training) of Llama-3 8B on a v5p-32 (16 chips, 4 hosts).

    python -m jaxtune.train --config configs/llama3_8b.py --config.data.train=DATA.txt \
        --workdir /mnt/BUCKET/RUN

Planned, not guessed (``python -m jaxtune.plan --config configs/llama3_8b.py --topology v5p-32
--config.model.path=llama3-8b``; the numbers are in configs/README.md): parameters and AdamW state
sharded over all 16 chips (8B x 12 bytes / 16 = 5.6 GiB a chip), bfloat16 compute on float32 master
weights, every layer rematerialised, and the global batch of 256 x 2048 tokens in 2 micro-batches:
about 51 GiB of a chip's 95. With ``dots`` rematerialisation the compiler asks for 250 GiB or more.

The checkpoint comes from the hub (``meta-llama/Meta-Llama-3-8B``, gated: log in first) or a local
directory via --config.model.path.
"""

from jaxtune.config import accelerator_defaults


def get_config(arg=None):
    c = accelerator_defaults()
    c.model.path = "meta-llama/Meta-Llama-3-8B"
    c.model.remat = "full"
    c.model.loss_chunk_tokens = 4096  # float32 logits of 4096 tokens x 128k vocab: 2 GB at a time
    c.data.train = arg or "data/train/*.txt"
    c.data.seq_len = 2048
    c.train.batch_size = 256
    c.train.grad_accum_steps = 2
    c.train.max_steps = 10_000
    c.optimizer.lr = 3e-5
    c.optimizer.warmup_steps = 200
    return c.lock()
