"""A CPU step's working memory kept in the process (jaxtune.hostmem): the kernel stops faulting it in
again every step, the process holds no more than that block, and it is kept only where it fits and
can take effect."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxtune import hostmem

# A jitted function whose working memory is one block, of about 100 MB or (large) just over 2 GiB, run a
# dozen times (the large one six); prints the page faults of each run after the first and the resident
# memory after it, with hostmem kept or not.
SCRIPT = """
import json, resource, sys
from jaxtune import hostmem
prepared = hostmem.prepare()
import jax, jax.numpy as jnp

def f(x):
    y = jnp.cumsum(jnp.exp(x), axis=0)
    return (y @ y.T).sum()

def large(x):  # two 300 x 1M float32 intermediates: 2.4 GB
    y = jnp.cumsum(x[None, :] * jnp.arange(1, 301, dtype=jnp.float32)[:, None], axis=0)
    return y[::7, ::5].sum()

fn, x = (large, jnp.ones((1_000_000,))) if sys.argv[2] == "large" else (f, jnp.ones((4096, 2048)) / 4096)
step = jax.jit(fn).lower(x).compile()
block = step.memory_analysis().temp_size_in_bytes
kept = sys.argv[1] == "keep" and hostmem.keep(block)
jax.block_until_ready(step(x))
faults, resident = [], []
for _ in range(6 if sys.argv[2] == "large" else 12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(step(x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    with open("/proc/self/statm") as f:
        resident.append(int(f.read().split()[1]) * 4096)
seen = {"prepared": prepared, "kept": kept, "block": block, "faults": faults, "resident": resident}
print(json.dumps(seen))
"""


def _faults(mode, size):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, size], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(hostmem._glibc() is None, reason="keeping memory needs glibc's malloc")
@pytest.mark.parametrize("size, block_gb", [("small", 0.1), ("large", 2.4)])
def test_kept_working_memory_is_not_faulted_in_again_each_step(size, block_gb):
    # The large block is over 2 GiB, past the largest trim threshold mallopt can be given as a number:
    # glibc trimmed such a block at every step until trimming was switched off outright.
    needed = hostmem.FIT * block_gb * 1e9 + 2e9  # hostmem's rule, and the function's input and output
    if hostmem._available_bytes() < needed:
        pytest.skip(f"under {needed / 1e9:.1f} GB of memory available: hostmem declines this block by design")
    given_back, kept = _faults("off", size), _faults("keep", size)
    assert given_back["prepared"] and kept["prepared"] and kept["kept"] and not given_back["kept"]
    pages = kept["block"] // 4096
    assert kept["block"] > 64 * 2**20  # larger than any block glibc would keep on its own
    assert kept["block"] > 0.9 * block_gb * 1e9
    # Handed back, every step faults its block in again. Kept, a step's block is the last one's (in some
    # runs two alternate, when a small allocation placed above a freed block leaves its hole a little
    # short of an aligned block: hostmem's doc), so at most two steps fault it in, and the process holds
    # at most one block more.
    assert min(given_back["faults"]) > pages // 2
    assert sum(f > pages // 4 for f in kept["faults"]) <= 2  # the block placed once, or twice
    assert kept["resident"][-1] - kept["resident"][0] < 1.25 * kept["block"]


class _Libc:
    """glibc's two calls, recorded instead of made (the test process's malloc stays as it is)."""

    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("trim", pad))
        return 1


@pytest.fixture
def libc(monkeypatch):
    """A recording glibc, and hostmem's state and JAX's dispatch setting restored afterwards (this
    process's runtime is running already: the setting no longer changes it)."""
    fake = _Libc()
    monkeypatch.setattr(hostmem, "_glibc", lambda: fake)
    monkeypatch.setattr(hostmem, "_state", {"kept": False, "block": 0})
    monkeypatch.setattr(hostmem, "_runtime_started", lambda: False)  # as in a command before its first step
    was = jax.config.values["jax_cpu_enable_async_dispatch"]
    yield fake
    jax.config.update("jax_cpu_enable_async_dispatch", was)


def test_steps_run_inline_on_one_cpu_device_after_prepare(libc, monkeypatch):
    one, every = np.array(jax.devices()[:1]), np.array(jax.devices())
    jax.config.update("jax_cpu_enable_async_dispatch", True)
    assert not hostmem.runs_inline(one)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert hostmem.prepare()
    assert hostmem.runs_inline(one)
    if every.size > 1:
        assert not hostmem.runs_inline(every)  # JAX dispatches a step over several asynchronously
    assert libc.calls == []


def test_prepare_is_too_late_once_the_runtime_runs(monkeypatch):
    # This process's runtime has started: the setting would no longer reach it, so nothing changes.
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    jax.devices()
    was = jax.config.values["jax_cpu_enable_async_dispatch"]
    assert not hostmem.prepare()
    assert jax.config.values["jax_cpu_enable_async_dispatch"] == was


def test_memory_is_kept_only_where_three_blocks_fit(libc, monkeypatch):
    monkeypatch.setattr(hostmem, "_available_bytes", lambda: 10 * 2**30)
    assert not hostmem.keep(4 * 2**30)  # 12 GB of blocks would not fit in 10 GB
    assert libc.calls == []
    assert hostmem.keep(3 * 2**30)
    assert libc.calls == [(hostmem._M_MMAP_MAX, 0), (hostmem._M_TRIM_THRESHOLD, hostmem._NEVER)]
    hostmem.release()
    assert libc.calls[2:] == [
        (hostmem._M_MMAP_MAX, hostmem._DEFAULT_MMAP_MAX),
        (hostmem._M_TRIM_THRESHOLD, hostmem._DEFAULT_TRIM_THRESHOLD),
        ("trim", 0),
    ]
    hostmem.release()  # once is enough
    assert len(libc.calls) == 5
    # A longer row length's larger block is checked again: kept if it fits, handed back if not.
    assert hostmem.keep(2 * 2**30) and hostmem.keep(2**30)
    assert len(libc.calls) == 7  # the smaller block needed nothing more
    assert not hostmem.keep(4 * 2**30)
    assert libc.calls[7:] == libc.calls[2:5]  # back to glibc's settings, free memory trimmed


@pytest.mark.parametrize(
    "platforms, cpu", [("cpu", True), ("tpu", False), ("cuda,cpu", False), (" cpu ,tpu", True)]
)
def test_prepare_leaves_accelerator_runs_alone(libc, monkeypatch, platforms, cpu):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    jax.config.update("jax_cpu_enable_async_dispatch", True)
    assert hostmem.prepare() == cpu
    assert jax.config.values["jax_cpu_enable_async_dispatch"] != cpu
