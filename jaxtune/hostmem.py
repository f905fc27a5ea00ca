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
needs, as long as nothing larger is allocated between steps (what an eval or a save takes then also
stays in the process until release()). Host work no longer overlaps a step, which on a CPU shares its
cores anyway.
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
# Trimming off: mallopt takes an int, and its largest (2**31 - 1) still let glibc trim a freed block
# over 2 GiB at every step (SmolLM2's packed 8 x 512 step: 4.8 GB faulted in again each step, a tenth of
# its time); -1 is the value mallopt(3) documents as disabling trimming completely.
_NEVER = -1
# Blocks that must fit in the available memory to keep one: the step's own, and room for one more in
# case something allocated between two steps (an evaluation, a checkpoint's copy) takes part of the
# freed block and the next step's is placed beside it.
FIT = 3

_state = {"kept": False, "block": 0}  # the largest block kept so far


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


def _runtime_started() -> bool:
    """Whether JAX's backends exist already (then the dispatch setting no longer reaches them). JAX
    has no public call for this; without its private one, assume not."""
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return False


def prepare() -> bool:
    """Before JAX's runtime starts (a command's first step), on a CPU: a step runs in the thread that
    calls it (see the module's doc), so that :func:`keep` can take effect later. Nothing changes on
    an accelerator, without glibc, or once the runtime has started (a config that touched it)."""
    if _glibc() is None or not _cpu_only():
        return False
    if _runtime_started():
        # (a library caller's process, a test's: a command's config does not start it)
        log.debug("JAX's runtime started before the run: each step's working memory goes back to the kernel")
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
    """The memory this process can still take: the kernel's MemAvailable, or less where a cgroup (a
    container) limits it."""
    available = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit, used in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit) as f, open(used) as g:
                cap, now = f.read().strip(), int(g.read().strip())
        except (OSError, ValueError):
            continue
        if cap.isdigit() and int(cap) < 2**60:  # "max", or v1's "no limit", is none
            available = min(available, max(int(cap) - now, 0))
    return available


def keep(block_bytes: int) -> bool:
    """Keep freed memory in the process from now on, for steps whose working memory is one block of
    ``block_bytes``; True if kept. Only for steps that run inside their dispatch (:func:`runs_inline`),
    and where :data:`FIT` blocks fit in the memory available. A later, larger block (a longer row
    length) is checked again, and memory goes back to the kernel if it does not fit."""
    if block_bytes <= _state["block"]:
        return _state["kept"]
    libc = _glibc()
    if libc is None:
        return False
    available = _available_bytes()
    if FIT * block_bytes > available:
        release()
        log.info(
            "each step's %.1f GB of working memory goes back to the kernel after the step (%.1f GB "
            "available; keeping it between steps needs %d times the block)",
            block_bytes / 1e9,
            available / 1e9,
            FIT,
        )
        return False
    if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _NEVER)):
        return False  # mallopt refused: memory goes back as before
    _state.update(kept=True, block=block_bytes)
    log.info(
        "each step's %.1f GB of working memory stays in the process between steps, so the kernel does "
        "not zero it again every step (train.keep_host_memory=False hands it back)",
        block_bytes / 1e9,
    )
    return True


def release() -> None:
    """Freed memory goes back to the kernel again (glibc's mmap and trim settings at their documented
    defaults; its dynamic mmap threshold stays where it was), and what is free now is handed back."""
    _state["block"] = 0
    if not _state["kept"]:
        return
    libc = _glibc()
    libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
    libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
    libc.malloc_trim(0)
    _state["kept"] = False
