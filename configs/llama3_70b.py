"""Fine-tuning Llama-3 70B on a large TPU pod slice (v5p-256 or larger).

    python -m jaxtune.train --config configs/llama3_70b.py --config.data.train=DATA.txt --workdir DIR

70B x 16 bytes of float32 weights and Adam state = 1.1 TB, so: FSDP over 32-way groups times 8-way
tensor parallelism inside a host's chips (heads, MLP and vocabulary split over ``tensor``), bfloat16
compute, full rematerialisation of each of the 80 scanned layers. Global batch 512 x 4096 tokens.
"""

from jaxtune.config import accelerator_defaults


def get_config(arg=None):
    c = accelerator_defaults()
    c.model.path = "meta-llama/Meta-Llama-3-70B"
    c.model.remat = "full"
    c.model.loss_chunk_tokens = 4096
    c.data.train = arg or "data/train/*.txt"
    c.data.seq_len = 4096
    c.train.batch_size = 512
    c.train.max_steps = 2_000
    c.optimizer.lr = 1e-5
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 32, 8
    c.checkpoint.every_steps = 200
    c.eval.every_steps = 200
    return c.lock()
