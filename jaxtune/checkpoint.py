"""Orbax checkpoints of a run, under ``workdir/checkpoints/<step>/``.

Each checkpoint holds four items: ``params`` (trainable), ``frozen`` (the rest of the model, so a
checkpoint is complete on its own), ``opt_state``, and ``meta`` (JSON: step, data position). Saves are
asynchronous; Orbax writes into a temporary directory and renames it when complete, so a save cut short
by a kill leaves only that temporary directory, which is reported and ignored. A checkpoint that fails
to restore (damaged on disk) is named in a warning and the one before it is used. The best-k set in
``workdir/checkpoints_best/`` is ranked by :class:`BestRanking`, recorded in its ``best.json``. The
model's config.json and tokenizer are in ``workdir/model/``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time

import jax
import orbax.checkpoint as ocp

from jaxtune import fs
from jaxtune.errors import CheckpointError, ModelNotFound, first_line

log = logging.getLogger(__name__)
TMP_MARK = ".orbax-checkpoint-tmp"
BEST_RECORD = "best.json"  # in checkpoints_best/: the ranking of the kept best steps, best first
DAMAGED = "checkpoints_damaged"  # in the workdir: checkpoints that failed to restore, moved out of the way
DISK_FULL = "No space left on device"  # how the OS's ENOSPC reads in Orbax's and TensorStore's errors


def directory(workdir: str) -> str:
    return os.path.join(fs.absolute(workdir), "checkpoints")


class SavePolicy:
    """When the run saves: every ``every_steps`` steps (0: never on a schedule), at the last step, and
    when it stops early (a signal, ``stop_after``, early stopping). A NaN never reaches a save: the
    step meter reports every step before it, and the loop checks the parameters are finite."""

    def __init__(self, every_steps: int, total: int):
        self.every, self.total = every_steps, total

    def due(self, step: int, stopping: bool = False) -> bool:
        return stopping or step == self.total or bool(self.every and step % self.every == 0)


class BestRanking:
    """The ``keep`` best evals by one metric: (step, value) pairs, best first. Ties go to the earlier
    step (a later eval must beat a kept one to displace it), and this one rule decides both what is
    kept on disk and which step ``best.json`` names."""

    def __init__(self, keep: int, mode: str, kept=()):
        self.keep, self.sign = keep, 1.0 if mode == "max" else -1.0
        self.kept = [(int(s), float(v)) for s, v in kept]

    def _order(self, entry):
        step, value = entry
        # A NaN or infinite metric ranks after every real one (a NaN would compare false with all).
        return (not math.isfinite(value), -self.sign * value if math.isfinite(value) else 0.0, step)

    def offer(self, step: int, value: float) -> tuple[bool, list[int]]:
        """Rank ``(step, value)``: (whether it is kept, the steps it pushes out)."""
        ranked = sorted([*(e for e in self.kept if e[0] != step), (step, value)], key=self._order)
        self.kept, out = ranked[: self.keep], [s for s, _ in ranked[self.keep :]]
        return step not in out, [s for s in out if s != step]

    @property
    def best(self) -> tuple[int, float] | None:
        return self.kept[0] if self.kept else None

    def until(self, step: int) -> list[int]:
        """Forget the evals after ``step`` (a resume recomputes them); returns their steps."""
        later = [s for s, _ in self.kept if s > step]
        self.kept = [e for e in self.kept if e[0] <= step]
        return later


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
        self.best_dir = self.dir + "_best"
        self.best = self.ranking = None
        self.best_metric = best_metric
        if best_metric:
            # No best_fn: which steps stay is decided by the ranking below, not by Orbax.
            best_options = ocp.CheckpointManagerOptions(
                max_to_keep=None, enable_async_checkpointing=async_save, create=True
            )
            self.best = ocp.CheckpointManager(self.best_dir, options=best_options)
            # A kill can come between best.json and the end of an asynchronous save: only steps on disk.
            on_disk = set(self.best.all_steps())
            kept = [e for e in read_best(self.best_dir).get("kept", ()) if int(e[0]) in on_disk]
            self.ranking = BestRanking(best_keep, best_mode, kept)
        partial = sorted(n for n in fs.listdir(self.dir) if TMP_MARK in n) if fs.isdir(self.dir) else []
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

    def offer_best(self, step: int, state: dict, frozen: dict, meta: dict, value: float) -> None:
        """Keep this eval's checkpoint if it ranks among the best (and drop those it pushes out)."""
        kept, dropped = self.ranking.offer(step, value)
        if dropped:
            self.best.wait_until_finished()  # a save still in flight is not deleted under Orbax's feet
            for old in dropped:
                if old in self.best.all_steps():
                    self.best.delete(old)
        if kept:
            self._save(self.best, self.best_dir, step, state, frozen, meta)
        if jax.process_index() == 0:
            write_best(self.best_dir, self.best_metric, self.ranking)

    def rewind_best(self, step: int) -> None:
        """At a resume from ``step``: drop the best checkpoints of later evals, which the run redoes."""
        if self.ranking is None:
            return
        later = self.ranking.until(step)
        on_disk = set(self.best.all_steps())
        later += [s for s in on_disk if s > step and s not in later]
        for s in later:
            if s in on_disk:
                self.best.delete(s)
        if later and jax.process_index() == 0:
            write_best(self.best_dir, self.best_metric, self.ranking)

    def best_step(self) -> tuple[int, float] | None:
        return None if self.ranking is None else self.ranking.best

    def _save(self, manager, where: str, step: int, state: dict, frozen: dict, meta: dict) -> None:
        self._room(step, where, state, frozen)
        with _disk_full_is_one_line(where):
            manager.save(step, args=_args(state, frozen, meta), force=True)

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

    def restore_best(self, step: int, abstract: dict) -> dict:
        """Items of best-k checkpoint ``step``."""
        self.best.wait_until_finished()
        return _restore(self.best, step, abstract)

    def restore(self, step: int, abstract: dict) -> dict:
        """Items of a checkpoint; ``abstract`` maps each wanted item to its abstract arrays (shapes,
        dtypes, shardings). ``meta`` comes back too."""
        return _restore(self.manager, step, abstract, meta=True)

    def restore_latest(self, abstract: dict) -> tuple[int | None, dict | None]:
        """(step, items) of the newest checkpoint that restores, or (None, None) when there is none.

        A damaged one (a truncated array file, a missing item) is named in a warning and moved to
        ``workdir/checkpoints_damaged/``, so the run goes on from the one before it and can save that
        step again; if every checkpoint is damaged, a CheckpointError says so."""
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                items = self.restore(step, abstract)
            except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many types for bad data
                damaged.append(step)
                log.warning(
                    "checkpoint %d in %s is damaged (%s); %s",
                    step,
                    self.dir,
                    _reason(e),
                    "trying the one before it" if step != min(self.manager.all_steps()) else "none left",
                )
                continue
            if damaged:
                self._set_aside(damaged)
                log.warning("resuming from step %d; damaged step(s) %s moved to %s", step, damaged, DAMAGED)
            return step, items
        if damaged:
            raise CheckpointError(
                f"no intact checkpoint in {self.dir} (damaged: steps {sorted(damaged)}); move the workdir "
                "away to start afresh, or restore the checkpoints from a copy"
            )
        return None, None

    def _set_aside(self, steps) -> None:
        if jax.process_index() == 0:
            aside = os.path.join(os.path.dirname(self.dir), DAMAGED)
            fs.makedirs(aside)
            for step in steps:
                target = os.path.join(aside, f"{step}")
                if fs.exists(target):
                    fs.rmtree(target)
                fs.move(os.path.join(self.dir, str(step)), target)
        if jax.process_count() > 1:  # the others must not list a step that is being moved (a copy on GCS)
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jaxtune: damaged checkpoints set aside")
        self.manager.reload()

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


def read_best(best_dir: str) -> dict:
    """``best.json`` of a best-checkpoint directory ({} when there is none or it is unreadable)."""
    path = os.path.join(best_dir, BEST_RECORD)
    try:
        record = json.loads(fs.read_text(path))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("%s is unreadable (%s); the best checkpoints are ranked again from here on", path, e)
        return {}
    if "kept" not in record and "step" in record:  # written before the ranking was recorded
        record["kept"] = [[record["step"], record["value"]]]
    return record


def write_best(best_dir: str, metric: str, ranking: BestRanking) -> None:
    """``best.json``: the best step and value, and every kept step with its value, best first. Written
    to a temporary file and renamed, so a kill never leaves half a record."""
    top = ranking.best
    record = {"metric": metric, "kept": [list(e) for e in ranking.kept]}
    if top is not None:
        record.update(step=top[0], value=top[1])
    fs.write_text(os.path.join(best_dir, BEST_RECORD), json.dumps(record))


def _restore(manager, step: int, abstract: dict, meta: bool = False) -> dict:
    args = {k: ocp.args.StandardRestore(v) for k, v in abstract.items() if jax.tree.leaves(v)}
    if meta:
        args["meta"] = ocp.args.JsonRestore()
    _skip_orbax_echoes()
    with _echoes_dropped_from_stderr():
        restored = dict(manager.restore(step, args=ocp.args.Composite(**args)))
    out = {k: restored.get(k, v) for k, v in abstract.items()}
    return out | {"meta": restored["meta"]} if meta else out


_ECHO_LINES = (
    "Traceback (most recent call last):",
    "asyncio/base_events.py",
    "self._check_closed()",
    "raise RuntimeError('Event loop is closed')",
    "Event loop is closed",
)


@contextlib.contextmanager
def _echoes_dropped_from_stderr():
    """Around a restore: TensorStore prints the closed-event-loop echoes (see below) from its own
    threads straight to file descriptor 2, past any Python hook. Standard error is caught in a file
    meanwhile and written back after, less those lines when the restore failed."""
    sys.stderr.flush()
    saved = os.dup(2)
    failed = False
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        except Exception:
            failed = True
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # jaxtune itself runs no asyncio code
            time.sleep(0.3)  # the abandoned readers finish within moments
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            lines = caught.read().decode("utf-8", "replace").splitlines(keepends=True)
            if failed:
                lines = [line for line in lines if not any(m in line for m in _ECHO_LINES) and line.strip()]
            sys.stderr.write("".join(lines))
            sys.stderr.flush()


def _reason(e: BaseException) -> str:
    """Why a restore failed, in a few words (TensorStore appends a page of spec after 'See full')."""
    return first_line(e).split(" See full TensorStore details")[0][:200]


def _skip_orbax_echoes() -> None:
    """When a restore fails on a damaged checkpoint, Orbax's other array readers fail on their own
    as they are collected, each printing a page of TensorStore spec (an unretrieved task, a callback
    into a closed event loop). The failure that matters is raised and reported in one line; these
    echoes of it are dropped, and nothing else is. The readers' coroutines are collected after the
    restore returns, so this hook stays; the closed-loop echoes are the stderr filter's."""
    if not isinstance(sys.unraisablehook, _SkipOrbaxEchoes):
        sys.unraisablehook = _SkipOrbaxEchoes(sys.unraisablehook)


class _SkipOrbaxEchoes:
    """A sys.unraisablehook that drops the abandoned readers' coroutines, and only those."""

    def __init__(self, hook):
        self.hook = hook

    def __call__(self, unraisable):
        where = getattr(unraisable.object, "__qualname__", "") or repr(unraisable.object)
        if "_read_array_index_and_device_put" in where or "async_deserialize" in where:
            return None
        return self.hook(unraisable)


def free_bytes(path: str) -> int | None:
    """Free bytes on the disk of ``path``; None where the OS cannot tell (a remote file system, an
    object store)."""
    if fs.is_url(path):
        return None
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


def split_path(path: str) -> tuple[str, str | None, int | None]:
    """(workdir, checkpoint directory or None, step or None) for ``WORKDIR``,
    ``WORKDIR/checkpoints/STEP`` or ``WORKDIR/checkpoints_best/STEP``."""
    path = fs.absolute(path).rstrip("/")
    head, tail = os.path.split(path)
    if tail.isdigit() and os.path.basename(head) in ("checkpoints", "checkpoints_best"):
        return os.path.dirname(head), head, int(tail)
    if tail.isdigit():  # WORKDIR/STEP
        return head, directory(head), int(tail)
    return path, None, None


def _read_only(where: str):
    # Read-only: restoring (for an export while the run trains, say) never cleans up the run's
    # temporary save directories.
    return ocp.CheckpointManager(where, options=ocp.CheckpointManagerOptions(read_only=True))


def _restore_shardings(state):
    """Where a restored model's parameters land: the first local device on one process (a pod's
    checkpoint exports on one machine); on several processes, FSDP over all their devices, so that no
    host holds more than its share (the export then gathers one tensor at a time)."""
    from flax import nnx

    if jax.process_count() == 1:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda _: device, nnx.to_pure_dict(state))
    import numpy as np
    from jax.sharding import Mesh

    from jaxtune import sharding
    from jaxtune.config import DEFAULT_RULES, MESH_AXES

    sizes = {"data": 1, "fsdp": jax.device_count(), "tensor": 1}
    log.info("restoring sharded over the %d devices of %d processes", jax.device_count(), jax.process_count())
    mesh = Mesh(np.asarray(jax.devices()).reshape([sizes[a] for a in MESH_AXES]), MESH_AXES)
    return sharding.state_shardings(state, mesh, DEFAULT_RULES)


def restore_model(path: str):
    """(model, tokenizer or None) of a training checkpoint: ``WORKDIR`` (its best checkpoint when the
    run kept them, else the latest) or ``WORKDIR/checkpoints[_best]/STEP``. A damaged checkpoint is
    named in a warning and the next one is taken (the next best, then the latest ones); a step asked
    for by name is never replaced. Parameters land on the first local device, whatever mesh the run
    used, so a pod's checkpoint exports on one machine; on several processes they are sharded over
    all devices (FSDP), each host holding its share."""
    from flax import nnx

    from jaxtune import optim, pretrained

    workdir, where, step = split_path(path)
    model_dir = os.path.join(workdir, "model")
    if not fs.exists(os.path.join(model_dir, "config.json")):
        raise ModelNotFound(
            f"{workdir}: not a jaxtune run directory (no model/config.json); pass --workdir's path"
        )
    latest_dir = directory(workdir)
    if not fs.isdir(latest_dir):
        raise ModelNotFound(f"{workdir}: has no checkpoints/ directory; the run saved no checkpoint")
    managers = {d: _read_only(d) for d in (latest_dir, latest_dir + "_best") if fs.isdir(d)}
    if step is not None:
        available = sorted(managers[where].all_steps()) if where in managers else []
        if step not in available:
            raise ModelNotFound(f"{where}: no checkpoint for step {step}; available: {available}")
        candidates = [(where, step)]
    else:
        best_dir = latest_dir + "_best"
        ranked = [s for s, _ in read_best(best_dir).get("kept", ())] if best_dir in managers else []
        candidates = [(best_dir, s) for s in ranked if s in managers[best_dir].all_steps()]
        candidates += [(latest_dir, s) for s in sorted(managers[latest_dir].all_steps(), reverse=True)]
        if not candidates:
            raise ModelNotFound(
                f"{latest_dir}: holds no complete checkpoint yet; wait for the run's first save"
            )
    with fs.fetched(model_dir) as local:  # config.json and the tokenizer's files, read locally
        graphdef, state = nnx.split(pretrained.abstract_model(local))
        try:
            tokenizer = pretrained.load_tokenizer(local)
        except (OSError, ValueError):
            tokenizer = None
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nnx.to_pure_dict(state),
        _restore_shardings(state),
    )
    try:
        for n, (where, step) in enumerate(candidates):
            manager = managers[where]
            try:
                meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                frozen_paths = frozenset(meta.get("frozen_paths", []))
                frozen, params = optim.split(target, frozen_paths.__contains__)
                restored = _restore(manager, step, {"params": params, "frozen": frozen})
            except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many types for bad data
                if len(candidates) == 1:
                    raise CheckpointError(
                        f"{where}/{step}: the checkpoint is damaged ({_reason(e)}); "
                        + (
                            "pass the workdir to take the newest intact one"
                            if split_path(path)[2] is not None
                            else "restore it from a copy"
                        )
                    ) from e
                last = n == len(candidates) - 1
                log.warning(
                    "checkpoint %s/%d is damaged (%s); %s",
                    where,
                    step,
                    _reason(e),
                    "no other checkpoint is left" if last else "taking the next one",
                )
                continue
            if n:
                log.warning("using checkpoint %s/%d in place of the damaged one(s) before it", where, step)
            elif where.endswith("_best"):
                log.info("taking the best checkpoint, step %d (%s)", step, os.path.join(where, BEST_RECORD))
            break
        else:
            raise CheckpointError(
                f"{workdir}: no intact checkpoint (tried {len(candidates)}); restore the workdir from a copy"
            )
    finally:
        for manager in managers.values():
            manager.close()
    model = nnx.merge(graphdef, optim.merge(restored["params"], restored["frozen"]))
    return model, tokenizer


def load_model(checkpoint: str | None = None, model: str | None = None, dtype="float32"):
    """(model, tokenizer or None) of a training checkpoint (see :func:`restore_model`) or of a model
    directory, hub id or GGUF file: what export, predict and evaluate take with --checkpoint / --model.
    A model without a readable tokenizer comes back with None and a warning naming why."""
    from jaxtune import pretrained

    if checkpoint:
        return restore_model(checkpoint)
    loaded = pretrained.load_pretrained(model, dtype=dtype)
    try:
        return loaded, pretrained.load_tokenizer(model)
    except (OSError, ValueError) as e:
        log.warning("%s: no tokenizer (%s)", model, e)
        return loaded, None
