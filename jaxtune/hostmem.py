"""A CPU train step's working memory kept in the process from one step to the next (glibc's malloc).

XLA's CPU runtime allocates a step's temporary buffers as one block (0.4 GB for MiniLM at 32 x 64,
5 GB for SmolLM2's packed 8 x 512) and frees it when the step ends. glibc's malloc maps a block that
large on its own and unmaps it on free, so every step the kernel faults in and zeroes each of its
pages again: a tenth of a step's time on a 2-core EPYC, as system time (benchmarks/README.md). Told
not to map blocks on their own nor to trim its heap, glibc hands the next step the same pages, already
resident.

That holds only if each step's block is freed before the next step's is allocated, by the thread that
allocates it: by default XLA runs a step on its own threads and frees the block a moment after the
results are ready, so the next step, dispatched then, often gets a second block beside the first; and
a worker thread's malloc arena cannot hold a large block at all, so glibc maps it on its own whatever
it is told. (With glibc's settings and one arena for every thread, a 100 MB block still came to 2 to 8
blocks resident over a dozen steps.) So on the CPU a step runs in the thread that calls it (JAX's
``jax_cpu_enable_async_dispatch`` off, before its runtime starts): allocation and free happen there,
one after the other, in the main heap. Most often every step then gets the same block back; sometimes
a small allocation placed above a freed block leaves its hole a little short of the next (aligned)
request, and two blocks alternate (measured on a 100 MB block: one run in six). Either way no step
faults its block in once that has settled, and the process holds at most one block more than the step
needs. Host work no longer overlaps a step, which on a CPU shares its cores anyway.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os

log = logging.getLogger("jaxtune.hostmem")

# glibc's mallopt parameters (malloc.h) and the defaults restored by release()
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_NEVER = 2**31 - 1  # mallopt takes an int
# Blocks that must fit in the available memory to keep one: the step's own, and room for one more in
# case something allocated between two steps (an evaluation, a checkpoint's copy) takes part of the
# freed block and the next step's is placed beside it.
FIT = 3

_state = {"kept": False}


def _glibc():
    """The C library when it is glibc (mallopt and malloc_trim), else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (musl, macOS: no such symbol)
        return libc
    except (OSError, AttributeError):
        return None


def _cpu_only() -> bool:
    """Whether JAX will run on the CPU: JAX_PLATFORMS says cpu, or it is unset and the machine has no
    GPU or TPU device files (the backend itself is not started here: that would start its threads)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    devices = ("/dev/nvidiactl", "/dev/kfd", "/dev/accel*", "/dev/vfio/[0-9]*")
    return not any(glob.glob(pattern) for pattern in devices)


def prepare() -> bool:
    """Before JAX's runtime starts (a command's first step), on a CPU: a step runs in the thread that
    calls it (see the module's doc), so that :func:`keep` can take effect later. Nothing changes on
    an accelerator or without glibc."""
    if _glibc() is None or not _cpu_only():
        return False
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True


def runs_inline(devices) -> bool:
    """Whether a step over ``devices`` (an array of them) runs inside its dispatch: on one CPU device
    after :func:`prepare` (JAX dispatches a step over several asynchronously all the same)."""
    import jax

    cpu = devices.size == 1 and devices.flat[0].platform == "cpu"
    return cpu and not jax.config.values["jax_cpu_enable_async_dispatch"]


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def keep(block_bytes: int) -> bool:
    """Keep freed memory in the process from now on, for steps whose working memory is one block of
    ``block_bytes``; True if kept. Only for steps that run inside their dispatch (:func:`runs_inline`),
    and where :data:`FIT` blocks fit in the memory available; otherwise memory goes back to the kernel
    as before."""
    if _state["kept"]:
        return True
    libc = _glibc()
    if libc is None:
        return False
    available = _available_bytes()
    if FIT * block_bytes > available:
        log.info(
            "each step's %.1f GB of working memory goes back to the kernel after the step (%.1f GB "
            "available; keeping it between steps needs three times the block)",
            block_bytes / 1e9,
            available / 1e9,
        )
        return False
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, _NEVER)
    _state["kept"] = True
    log.info(
        "each step's %.1f GB of working memory stays in the process between steps, so the kernel does "
        "not zero it again every step (train.keep_host_memory=False hands it back)",
        block_bytes / 1e9,
    )
    return True


def release() -> None:
    """glibc's defaults again, and the free memory handed back to the kernel."""
    if not _state["kept"]:
        return
    libc = _glibc()
    libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
    libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
    libc.malloc_trim(0)
    _state["kept"] = False
