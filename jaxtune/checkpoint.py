"""Orbax checkpoints of a run, under ``workdir/checkpoints/<step>/``.

Each checkpoint holds four items: ``params`` (trainable), ``frozen`` (the rest of the model, so a
checkpoint is complete on its own), ``opt_state``, and ``meta`` (JSON: step, data position). Saves are
asynchronous; Orbax writes into a temporary directory and renames it when complete, so a save cut short
by a kill leaves only that temporary directory, which is reported and ignored. The model's
config.json and tokenizer are in ``workdir/model/``, written once at the start of the run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)
TMP_MARK = ".orbax-checkpoint-tmp"
BEST_RECORD = "best.json"  # in checkpoints_best/: the step whose metric is the best so far
ITEMS = ("params", "frozen", "opt_state")
DISK_FULL = "No space left on device"  # how the OS's ENOSPC reads in Orbax's and TensorStore's errors


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written (the disk is full); the message names the step, sizes and way out."""


def directory(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpoints:
    """The run's latest ``keep`` checkpoints, and with a ``best_metric`` also the ``best_keep`` best ones
    by that eval metric (``best_mode`` max or min), under ``workdir/checkpoints_best/``."""

    def __init__(
        self,
        workdir: str,
        keep: int = 3,
        async_save: bool = True,
        best_metric: str = "",
        best_mode: str = "max",
        best_keep: int = 1,
    ):
        self.dir = directory(workdir)
        self.best = None
        if best_metric:
            best_options = ocp.CheckpointManagerOptions(
                max_to_keep=best_keep,
                best_fn=lambda metrics: metrics[best_metric],
                best_mode=best_mode,
                keep_checkpoints_without_metrics=False,
                enable_async_checkpointing=async_save,
                create=True,
            )
            self.best = ocp.CheckpointManager(self.dir + "_best", options=best_options)
        partial = sorted(n for n in os.listdir(self.dir) if TMP_MARK in n) if os.path.isdir(self.dir) else []
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True
        )
        self.manager = ocp.CheckpointManager(self.dir, options=options)
        if partial:
            log.warning(
                "ignoring %d half-written checkpoint(s) in %s (a save was interrupted): %s; "
                "the latest complete one is step %s",
                len(partial),
                self.dir,
                ", ".join(partial),
                self.latest(),
            )

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, frozen: dict, meta: dict) -> None:
        self._save(self.manager, self.dir, step, state, frozen, meta)

    def save_best(self, step: int, state: dict, frozen: dict, meta: dict, metrics: dict) -> None:
        """Offer a checkpoint to the best-k set; Orbax keeps it if its metric ranks among the best."""
        self._save(self.best, self.dir + "_best", step, state, frozen, meta, metrics=metrics)

    def _save(self, manager, where: str, step: int, state: dict, frozen: dict, meta: dict, **kwargs) -> None:
        self._room(step, where, state, frozen)
        with _disk_full_is_one_line(where):
            manager.save(step, args=_args(state, frozen, meta), force=True, **kwargs)

    @staticmethod
    def _room(step: int, where: str, state: dict, frozen: dict) -> None:
        """Refuse a save that cannot fit before it starts: a disk filled half-way fails in Orbax's
        background threads with pages of tracebacks, and leaves a partial directory behind."""
        free = free_bytes(where)
        need = _bytes_written_here((state["params"], state["opt_state"], frozen))
        if free is not None and need > free:
            raise CheckpointError(
                _full_message(
                    f"the checkpoint of step {step}",
                    where,
                    f"it needs {_size(need)}, {_size(free)} are free",
                )
            )

    def record_best(self, step: int, metric: str, value: float) -> None:
        with open(os.path.join(self.dir + "_best", BEST_RECORD), "w") as f:
            json.dump({"step": step, "metric": metric, "value": value}, f)

    def restore_best(self, step: int, abstract: dict) -> dict:
        """Items of best-k checkpoint ``step``."""
        self.best.wait_until_finished()
        args = {k: ocp.args.StandardRestore(v) for k, v in abstract.items() if jax.tree.leaves(v)}
        restored = dict(self.best.restore(step, args=ocp.args.Composite(**args)))
        return {k: restored.get(k, v) for k, v in abstract.items()}

    def restore(self, step: int, abstract: dict) -> dict:
        """Items of a checkpoint; ``abstract`` maps each wanted item to its abstract arrays (shapes,
        dtypes, shardings). ``meta`` comes back too."""
        args = {k: ocp.args.StandardRestore(v) for k, v in abstract.items() if jax.tree.leaves(v)}
        args["meta"] = ocp.args.JsonRestore()
        restored = dict(self.manager.restore(step, args=ocp.args.Composite(**args)))
        return {k: restored.get(k, v) for k, v in abstract.items()} | {"meta": restored["meta"]}

    def wait(self) -> None:
        with _disk_full_is_one_line(self.dir):
            self.manager.wait_until_finished()
            if self.best is not None:
                self.best.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
        if self.best is not None:
            self.best.close()

    def abandon(self) -> None:
        """Close after a failed run: a save still in flight may fail too, and that must not hide the
        error the run stopped for."""
        for manager in (self.manager, self.best):
            try:
                if manager is not None:
                    manager.close()
            except Exception as e:  # noqa: BLE001 - logged; the run's own error is already on its way
                log.warning("closing the checkpoints in %s after the failed run: %s", self.dir, str(e)[:300])


def free_bytes(path: str) -> int | None:
    """Free bytes on the disk of ``path``; None where the OS cannot tell (a remote file system)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _bytes_written_here(tree) -> int:
    """What this process writes of ``tree``: one copy of each shard it holds (replica 0)."""
    total = 0
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array):
            total += sum(s.data.nbytes for s in x.addressable_shards if s.replica_id == 0)
        elif hasattr(x, "nbytes"):
            total += x.nbytes
    return total


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _full_message(what: str, where: str, detail: str) -> str:
    return (
        f"no room for {what} in {where} ({detail}); free disk space, lower checkpoint.keep / "
        "checkpoint.best_keep, or pass a --workdir on a bigger disk"
    )


@contextlib.contextmanager
def _disk_full_is_one_line(where: str):
    """Turns ENOSPC from Orbax into a CheckpointError. Saves are asynchronous, so a full disk shows
    at the next save or wait, not necessarily the step being saved."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        if DISK_FULL not in str(e):
            raise
        raise CheckpointError(_full_message("a checkpoint", where, DISK_FULL)) from e


def _args(state: dict, frozen: dict, meta: dict):
    trees = {"params": state["params"], "frozen": frozen, "opt_state": state["opt_state"]}
    # Orbax refuses empty trees (no frozen parameters, a stateless optimizer): they are left out.
    args = {k: ocp.args.StandardSave(v) for k, v in trees.items() if jax.tree.leaves(v)}
    args["meta"] = ocp.args.JsonSave(meta)
    return ocp.args.Composite(**args)


def split_path(path: str) -> tuple[str, int | None]:
    """(workdir, step or None) for ``WORKDIR`` or ``WORKDIR/checkpoints/STEP`` or ``WORKDIR/STEP``."""
    path = os.path.abspath(path)
    head, tail = os.path.split(path)
    if tail.isdigit():
        workdir = os.path.dirname(head) if os.path.basename(head) == "checkpoints" else head
        return workdir, int(tail)
    return path, None


def restore_model(path: str):
    """(model, tokenizer or None) of a training checkpoint: ``WORKDIR`` (the latest step) or
    ``WORKDIR/checkpoints/STEP``. Parameters land on the first local device, whatever mesh the run
    used, so a pod's checkpoint exports on one machine."""
    from flax import nnx

    from jaxtune import optim, pretrained

    workdir, step = split_path(path)
    model_dir = os.path.join(workdir, "model")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(
            f"{workdir}: not a jaxtune run directory (no model/config.json); pass --workdir's path"
        )
    if not os.path.isdir(directory(workdir)):
        raise FileNotFoundError(f"{workdir}: has no checkpoints/ directory; the run saved no checkpoint")
    ckpts = Checkpoints(workdir, async_save=False)
    manager = ckpts.manager
    record = os.path.join(ckpts.dir + "_best", BEST_RECORD)
    if step is None and os.path.exists(record):  # a run that kept its best checkpoints exports the best
        with open(record) as f:
            step = json.load(f)["step"]
        manager = ocp.CheckpointManager(
            ckpts.dir + "_best", options=ocp.CheckpointManagerOptions(read_only=True)
        )
        log.info("exporting the best checkpoint, step %d (%s)", step, record)
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
        raise FileNotFoundError(
            f"{ckpts.dir}: no checkpoint for step {step}; available: {sorted(manager.all_steps())}"
        )
    ckpts.manager = manager
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    graphdef, state = nnx.split(pretrained.abstract_model(model_dir))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), nnx.to_pure_dict(state)
    )
    frozen_paths = set(meta.get("frozen_paths", []))
    frozen, params = optim.split(target, lambda p: p in frozen_paths)
    restored = ckpts.restore(step, {"params": params, "frozen": frozen})
    ckpts.close()
    model = nnx.merge(graphdef, optim.merge(restored["params"], restored["frozen"]))
    try:
        tokenizer = pretrained.load_tokenizer(model_dir)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer
