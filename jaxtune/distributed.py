"""The multi-process runtime: when a command runs as one of several processes (the hosts of a TPU pod,
the nodes of a GPU cluster, or processes on one machine in the tests), they join one JAX runtime before
any of them touches a device.

Two ways in:

- explicit, for GPU clusters and local runs: ``--coordinator HOST:PORT --num_processes N --process_id I``
  (or the environment variables ``JAXTUNE_COORDINATOR``, ``JAXTUNE_NUM_PROCESSES``,
  ``JAXTUNE_PROCESS_ID``);
- detected, where JAX finds the cluster itself: a Cloud TPU VM (its slice's workers come from the
  VM's metadata server; a single-host slice forms a runtime of one), a Slurm job step (``srun``) or an
  Open MPI job of several tasks, or ``JAX_COORDINATOR_ADDRESS`` set.

A single process never initialises anything: it is the common case and needs no coordinator.
"""

from __future__ import annotations

import logging
import os

from jaxtune.errors import RuntimeJoinError, UsageError, first_line

log = logging.getLogger(__name__)

ENV = {
    "coordinator": "JAXTUNE_COORDINATOR",
    "num_processes": "JAXTUNE_NUM_PROCESSES",
    "process_id": "JAXTUNE_PROCESS_ID",
}


def add_arguments(p) -> None:
    """The explicit runtime flags, defaulting to their environment variables."""
    g = p.add_argument_group("multi-process runtime (auto-detected on Cloud TPU, Slurm and Open MPI)")
    g.add_argument(
        "--coordinator",
        default=os.environ.get(ENV["coordinator"]),
        metavar="HOST:PORT",
        help=f"address of process 0's coordinator service [env {ENV['coordinator']}]",
    )
    g.add_argument(
        "--num_processes",
        type=int,
        default=_env_int("num_processes"),
        help=f"how many processes form the run [env {ENV['num_processes']}]",
    )
    g.add_argument(
        "--process_id",
        type=int,
        default=_env_int("process_id"),
        help=f"this process's index, 0 .. num_processes - 1 [env {ENV['process_id']}]",
    )


def _env_int(key: str):
    text = os.environ.get(ENV[key])
    if text in (None, ""):
        return None
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"environment variable {ENV[key]}={text!r} is not an integer") from None


def _detected_cluster() -> str | None:
    """The kind of multi-process job this process belongs to, from its environment, or None."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS") or _on_tpu_vm():
        return "Cloud TPU"
    # Only srun's job steps set it; an sbatch script or an salloc shell is one process.
    if int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1:
        return "Slurm"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "Open MPI"
    return None


def _on_tpu_vm() -> bool:
    """A Cloud TPU VM: its chips are /dev/accel* (v4, v5e) or VFIO devices (v5p, v6e). The workers of
    its slice are in the metadata server, which jax.distributed reads; the environment may not have
    them."""
    import glob

    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def initialize(coordinator=None, num_processes=None, process_id=None) -> bool:
    """Join the run's JAX runtime when it has several processes; True when it does. Call before
    anything touches a device."""
    import jax

    given = {"--coordinator": coordinator, "--num_processes": num_processes, "--process_id": process_id}
    if any(v is not None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise UsageError(
                f"{', '.join(missing)} missing: an explicit multi-process run needs --coordinator, "
                "--num_processes and --process_id (or their JAXTUNE_* environment variables)"
            )
        if num_processes < 1:
            raise UsageError(f"--num_processes {num_processes} must be at least 1")
        if not 0 <= process_id < num_processes:
            raise UsageError(
                f"--process_id {process_id} is not in 0 .. {num_processes - 1} "
                f"(--num_processes {num_processes})"
            )
        if num_processes == 1:
            return False
        if ":" not in coordinator:
            raise UsageError(f"--coordinator {coordinator!r} is not HOST:PORT")
        # CPU devices of different processes talk through gloo (the default has no cross-process
        # collectives); accelerators keep their own.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        _join(jax, coordinator, num_processes, process_id)
    else:
        cluster = _detected_cluster()
        if cluster is None:
            return False
        log.info("multi-process run detected (%s)", cluster)
        _join(jax)
    log.info(
        "process %d of %d: %d local devices, %d in all",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def _join(jax, *args) -> None:
    try:
        jax.distributed.initialize(*args)
    except Exception as e:  # a coordinator that never answers, a second initialisation, a bad address
        where = f" at {args[0]}" if args else ""
        raise RuntimeJoinError(
            f"could not join the multi-process runtime{where}: {first_line(e)}; start every process with "
            "the same --coordinator and --num_processes, and a distinct --process_id"
        ) from e


def is_main() -> bool:
    """Whether this process writes the run's files (logs, metrics, config, exports): process 0."""
    import jax

    return jax.process_index() == 0


def gather_json(value) -> list:
    """``value`` (JSON-able) of every process, by process index; a collective, so every process calls
    it at the same point (a streaming run's data positions, saved in each checkpoint)."""
    import jax

    if jax.process_count() == 1:
        return [value]
    import json

    import numpy as np
    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([len(blob)], np.int64)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: len(blob)] = blob
    every = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(every, sizes, strict=True)]
