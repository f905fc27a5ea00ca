"""Model FLOPs per token and device peak rates, for tokens/s -> MFU.

FLOPs follow the PaLM appendix convention: 6 x (matmul parameters) per token for forward and
backward, plus 12 x layers x heads x head_dim x sequence length for attention, halved for a causal
decoder (its tokens see the keys up to themselves, as MaxText counts it); rematerialisation is not
counted (that would be hardware FLOPs utilisation). The embedding lookup is not a matmul; the
output layer is, tied or not.
"""

from __future__ import annotations

import fcntl
import functools
import json
import math
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import jaxlib

from jaxtune import assets

# Dense bfloat16 peak per chip, by device_kind substring (first match wins).
PEAK_FLOPS = (
    ("v6", 918e12),
    ("v5 lite", 197e12),  # v5e reports itself as "TPU v5 lite"
    ("v5e", 197e12),
    ("v5", 459e12),  # v5p reports itself as "TPU v5"
    ("v4", 275e12),
    ("h200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
)


# The best rate each CPU has shown, by machine, dtype, jaxlib and XLA flags: one process's reading
# is a lower bound (a busy neighbour on a shared host once read 40% low and put a step at "98% MFU").
PEAK_FILE = os.path.join(assets.CACHE, "cpu_peak.json")


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s, which ``lscpu`` shows): what the peak cache is keyed
    by and the benchmarks record."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _time_matmul(dtype: str, n: int, repeats: int) -> float:
    a = jax.device_put(jnp.ones((n, n), dtype), jax.devices("cpu")[0])
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


@functools.cache
def measured_cpu_flops(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an ``n x n`` matrix product in ``dtype`` (the compute dtype) on this machine's CPU: the
    best of ``repeats`` timed now (once per process), or the best this machine has shown before
    (kept in :data:`PEAK_FILE`), whichever is higher. CPUs differ too much (2x between two machines of
    this project) for a constant, and shared hosts too much from one minute to the next for a single
    reading."""
    rate = _time_matmul(dtype, n, repeats)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # Whatever changes the kernels or the cores they run on: jaxlib (XLA's kernels), XLA_FLAGS.
    key = (
        f"{cpu_name()} | {cores} cores | jaxlib {jaxlib.__version__} | {dtype} | {n} | "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}"
    )
    return max(rate, _remember(key, rate))


def _read_peaks() -> dict:
    """:data:`PEAK_FILE`'s usable entries: positive finite rates by key (a damaged file counts as empty)."""
    try:
        with open(PEAK_FILE, encoding="utf-8") as f:
            seen = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(seen, dict):
        return {}
    return {
        k: float(v)
        for k, v in seen.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    }


def _remember(key: str, rate: float) -> float:
    """The best rate :data:`PEAK_FILE` holds for ``key`` (0 if none), which becomes ``rate`` if that is
    higher. The file is read and replaced under a lock (several processes of one machine measure at
    once) and written whole (a temporary file, then a rename); a cache that cannot be written costs
    the memory, not the run."""
    folder = os.path.dirname(PEAK_FILE)
    try:
        os.makedirs(folder, exist_ok=True)
        lock = open(PEAK_FILE + ".lock", "a")  # held until the file is replaced
    except OSError:
        return _read_peaks().get(key, 0.0)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        seen = _read_peaks()
        best = seen.get(key, 0.0)
        if rate <= best:
            return best
        tmp = None
        try:
            with tempfile.NamedTemporaryFile(
                "w", dir=folder, prefix=".cpu_peak-", suffix=".tmp", delete=False
            ) as f:
                tmp = f.name
                json.dump({**seen, key: rate}, f, indent=1)
            os.replace(tmp, PEAK_FILE)
        except OSError:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
        return best


GPUS = ("h200", "h100", "a100")


def datasheet_peak(device_kind: str, compute_dtype: str = "bfloat16") -> float:
    """The dense peak of a chip by its ``device_kind`` for ``compute_dtype``; 0 when the table does not
    know it. 16-bit types: the bfloat16 peak. float32: on these GPUs JAX's default precision runs it as
    TF32, at half the bfloat16 rate; a TPU's default precision runs it as one bfloat16 pass."""
    kind = device_kind.lower()
    flops = next((flops for key, flops in PEAK_FLOPS if key in kind), 0.0)
    if jnp.dtype(compute_dtype).itemsize > 2 and any(gpu in kind for gpu in GPUS):
        return flops / 2
    return flops


def peak_is_measured(override_tflops: float = 0.0) -> bool:
    """Whether :func:`peak_flops_per_device` measures the peak (a CPU) rather than reading a datasheet."""
    return not override_tflops and jax.devices()[0].platform == "cpu"


def peak_flops_per_device(override_tflops: float = 0.0, compute_dtype: str = "float32") -> float:
    """The device's dense peak in ``compute_dtype``: the datasheet's on TPU and GPU, measured on CPU."""
    if override_tflops:
        return override_tflops * 1e12
    device = jax.devices()[0]
    flops = datasheet_peak(device.device_kind, compute_dtype)
    if flops:
        return flops
    if device.platform == "cpu":
        # forced host devices share the cores
        return measured_cpu_flops(compute_dtype) / jax.local_device_count()
    return 0.0


def peak_flops(devices, override_tflops: float = 0.0, compute_dtype: str = "float32") -> float:
    """The dense peak of a run on ``devices``. On CPU, the measured rate of each host the devices are
    on: forced host devices are slices of one machine that run on all of its cores, so a run on one of
    them has the machine's rate, not its share. Elsewhere, the per-device peak times the devices."""
    if peak_is_measured(override_tflops):
        return measured_cpu_flops(compute_dtype) * len({d.process_index for d in devices})
    return peak_flops_per_device(override_tflops, compute_dtype) * len(devices)


def flops_per_token(cfg, seq_len: int, output_layer: bool = True, adapter_params: int | None = None) -> float:
    """Training FLOPs per token (forward + backward); ``output_layer``: the vocabulary projection of a
    language model (a classifier's head is negligible). ``adapter_params``: with LoRA, the adapters'
    parameter count: the frozen base then costs 4 FLOPs per weight and token (forward, and the
    backward pass through it, but no weight gradient), the adapters 6."""
    d, f, n, k, h, L = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.num_layers,
    )
    attn_proj = d * h * (2 * n + 2 * k)  # q, o and k, v
    mlp = d * f * (3 if cfg.gated_mlp else 2)
    matmul_params = L * (attn_proj + mlp)
    head = output_layer_flops_per_token(cfg, adapter_params is not None) if output_layer else 0.0
    # q k^T and the weighted sum of v: 4 n h FLOPs per key a token attends to, times 3 for the backward
    # pass. A causal token attends to the keys up to itself, half the row on average (MaxText's count;
    # the fused kernels skip the blocks above the diagonal), an encoder's token to all of them.
    attention = 12.0 * L * n * h * seq_len * (0.5 if cfg.causal else 1.0)
    if adapter_params is not None:
        return 4.0 * matmul_params + 6.0 * adapter_params + attention + head
    return 6.0 * matmul_params + attention + head


def output_layer_flops_per_token(cfg, frozen: bool = False) -> float:
    """A language model's vocabulary projection, per token it is computed for: 6 FLOPs per weight,
    4 when it is ``frozen`` (LoRA: no weight gradient)."""
    return (4.0 if frozen else 6.0) * cfg.hidden_size * cfg.vocab_size
