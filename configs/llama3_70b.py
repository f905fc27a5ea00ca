"""Full fine-tuning of Llama-3.1-70B on a v5p-256 (128 chips, 32 hosts) or a v6e-256 (256 chips, 64
hosts): ``configs/llama3_70b.py`` or ``configs/llama3_70b.py:v6e-256``.

    python -m jaxtune.train --config configs/llama3_70b.py[:v6e-256] --config.data.train=DATA \
        --workdir /mnt/BUCKET/RUN

Planned, not guessed (``python -m jaxtune.plan --config configs/llama3_70b.py[:v6e-256] --topology
v5p-256|v6e-256 --config.model.path=llama3.1-70b``; numbers in configs/README.md). A v5p-256 is 128
chips (Cloud TPU counts TensorCores), so the mesh is FSDP 32 x tensor 4 = 128; the v6e-256's 256 chips
of 32 GiB take FSDP 32 x tensor 8. Both: 70B x 12 bytes of float32 weights and AdamW state sharded over
every chip, bfloat16 compute, every one of the 80 scanned layers rematerialised, and the global batch
of 512 x 4096 tokens in micro-batches small enough for the chip (4 on v5p: 84 GiB of 95; 16 on v6e,
one row per FSDP shard: 22 GiB of 32).
"""

from jaxtune.config import accelerator_defaults
from jaxtune.errors import ConfigError

SLICES = {
    # slice: (mesh.fsdp, mesh.tensor, train.grad_accum_steps)
    "v5p-256": (32, 4, 4),
    "v6e-256": (32, 8, 16),
}


def get_config(arg=None):
    slice_name = arg or "v5p-256"
    if slice_name not in SLICES:
        raise ConfigError(f"configs/llama3_70b.py:{slice_name}: planned slices are {', '.join(SLICES)}")
    fsdp, tensor, accum = SLICES[slice_name]
    c = accelerator_defaults()
    c.model.path = "meta-llama/Llama-3.1-70B"
    c.model.remat = "full"
    c.model.loss_chunk_tokens = 4096
    c.data.train = "data/train/*.txt"
    c.data.seq_len = 4096
    c.train.batch_size = 512
    c.train.grad_accum_steps = accum
    c.train.max_steps = 2_000
    c.optimizer.lr = 1e-5
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, fsdp, tensor
    c.checkpoint.every_steps = 200
    c.eval.every_steps = 200
    return c.lock()
