"""Orbax checkpoints of a run, under ``workdir/checkpoints/<step>/``.

Each checkpoint holds four items: ``params`` (trainable), ``frozen`` (the rest of the model, so a
checkpoint is complete on its own), ``opt_state``, and ``meta`` (JSON: step, data position). Saves are
asynchronous; Orbax writes into a temporary directory and renames it when complete, so a save cut short
by a kill leaves only that temporary directory, which is reported and ignored. The model's
config.json and tokenizer are in ``workdir/model/``, written once at the start of the run.
"""

from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)
TMP_MARK = ".orbax-checkpoint-tmp"
ITEMS = ("params", "frozen", "opt_state")


def directory(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpoints:
    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.dir = directory(workdir)
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
        trees = {"params": state["params"], "frozen": frozen, "opt_state": state["opt_state"]}
        # Orbax refuses empty trees (no frozen parameters, a stateless optimizer): they are left out.
        args = {k: ocp.args.StandardSave(v) for k, v in trees.items() if jax.tree.leaves(v)}
        args["meta"] = ocp.args.JsonSave(meta)
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(self, step: int, abstract: dict) -> dict:
        """Items of a checkpoint; ``abstract`` maps each wanted item to its abstract arrays (shapes,
        dtypes, shardings). ``meta`` comes back too."""
        args = {k: ocp.args.StandardRestore(v) for k, v in abstract.items() if jax.tree.leaves(v)}
        args["meta"] = ocp.args.JsonRestore()
        restored = dict(self.manager.restore(step, args=ocp.args.Composite(**args)))
        return {k: restored.get(k, v) for k, v in abstract.items()} | {"meta": restored["meta"]}

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


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
    step = ckpts.latest() if step is None else step
    if step is None or step not in ckpts.manager.all_steps():
        raise FileNotFoundError(
            f"{ckpts.dir}: no checkpoint for step {step}; available: {sorted(ckpts.manager.all_steps())}"
        )
    meta = ckpts.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
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
