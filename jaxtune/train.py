"""Train a model.

    python -m jaxtune.train --config configs/X.py[:arg] [--config.KEY=VALUE ...] --workdir DIR

Config -> mesh -> model (loaded or created straight into its shards) -> data -> one jitted step in a
loop, with Orbax checkpoints in ``DIR/checkpoints`` (a rerun on the same DIR resumes), metrics in
``DIR/metrics.jsonl`` and TensorBoard files in DIR. SIGTERM (how TPU VMs are preempted) or Ctrl-C
finishes the current step, saves, and exits 0; a second one exits at once. One run at a time holds DIR.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune import (
    checkpoint,
    cli,
    data,
    evaluators,
    finish,
    fs,
    hostmem,
    mfu,
    optim,
    pretrained,
    sharding,
    steps,
)
from jaxtune.best import BestTracker
from jaxtune.config import validate
from jaxtune.data.loader import Batches
from jaxtune.data.stream import StreamBatches, reader_of
from jaxtune.errors import ConfigError, TrainingError
from jaxtune.logical import activation_sharding
from jaxtune.meter import NonFiniteLoss, StepMeter
from jaxtune.models import lora, presets
from jaxtune.plan import load_model, mesh_rules, model_spec, plan
from jaxtune.stopping import StopSignals
from jaxtune.workdir import Lock
from jaxtune.writers import MetricsWriter

log = logging.getLogger("jaxtune.train")


def load_tokenizer(config):
    """The run's tokenizer, with ``data.chat_template`` (a Jinja string or a file) in place of its own."""
    name = config.model.tokenizer or config.model.path
    if name in presets.PRESETS:
        raise ConfigError(
            f"config key model.tokenizer is empty and {name!r} is a preset; set model.tokenizer"
        )
    tokenizer = pretrained.load_tokenizer(name)
    template = config.data.chat_template
    if template:
        if os.path.isfile(template):
            with open(template, encoding="utf-8") as f:
                template = f.read()
        tokenizer.chat_template = template
    return tokenizer


def run(config, workdir: str, stop_after: int | None = None, devices=None, labels=None) -> dict:
    """Train as ``config`` says, in ``workdir``; returns the last train and eval losses and the step
    (with ``stopped``: the signal that stopped it).

    ``stop_after`` ends the run after that many steps in total (with a checkpoint), as a preemption
    would: a later run on the same workdir continues it. ``devices`` (default: all) carry the mesh.
    ``labels``: a classifier's label space (:class:`jaxtune.models.heads.Labels`) when it is not to be
    read from the training records (cross-validation fixes one for every fold).
    """
    devices = jax.devices() if devices is None else list(devices)
    validate(config, len(devices))
    # One run per workdir: a second one would interleave metrics and race the checkpoint saves.
    with Lock(workdir, enabled=jax.process_index() == 0):
        return Run(config, workdir, devices, labels).train(stop_after)


class Run:
    """One training run: its plan, state, data and parts, built in that order; :meth:`train` is the loop."""

    def __init__(self, config, workdir: str, devices, labels=None):
        self.config, self.workdir = config, workdir
        c = config.train
        mesh = sharding.make_mesh(config, devices)
        self.tokenizer = load_tokenizer(config)
        self.labels = labels if labels is not None else data.training_labels(config)
        spec = model_spec(config, self.labels)
        if spec.cfg.vocab_size < len(self.tokenizer):
            raise ConfigError(
                f"the tokenizer has {len(self.tokenizer)} tokens but the model's vocabulary only "
                f"{spec.cfg.vocab_size}; use the model's own tokenizer (model.tokenizer) or a larger "
                "vocabulary"
            )
        # The weights load before the data are tokenized: a damaged checkpoint is found in seconds.
        model = load_model(config, mesh, mesh_rules(config), self.labels, spec.lora)
        pid = jax.process_index()
        mine = sharding.process_rows(sharding.batch_sharding(mesh, mesh_rules(config)), c.batch_size)
        if config.data.streaming:
            self.eval_rows = data.load_eval(config.data, self.tokenizer, self.labels)
            processes = (pid, jax.process_count())
            reader = reader_of(mine, processes)  # processes that feed the same rows read alike
            self.batches = StreamBatches(
                config.data, self.tokenizer, c.batch_size, c.seed, mine, reader, processes
            )
            types = False
        else:
            train_rows, self.eval_rows = data.load(config.data, self.tokenizer, c.seed, self.labels)
            self.batches = Batches(
                train_rows,
                c.batch_size,
                c.seed,
                mine,
                weights=config.data.weights,
                pad_to_multiple_of=config.data.pad_to_multiple_of,
            )
            types = "token_type_ids" in train_rows[0]
        self.total = c.max_steps or c.num_epochs * self.batches.steps_per_epoch
        self.plan = plan(config, mesh, self.total, self.labels, spec, token_types=types)
        self.state, self.frozen = self.plan.materialise(self.labels, model)
        del model
        if pid == 0:
            # Written once the model and the data are known to load, so a rerun that fails on either
            # leaves the files of the run before it as they were.
            model = self.plan.spec.graphdef, self.state, self.frozen
            with fs.staged(os.path.join(workdir, "model"), stale=fs.listdir) as model_dir:
                pretrained.write_config(_merged(*model), model_dir, config.model.param_dtype, self.tokenizer)
                pretrained.write_lora(spec.lora, model_dir)
            record = config.to_json_best_effort(indent=2, sort_keys=True)
            fs.write_text(os.path.join(workdir, "config.json"), record)
        self.peak = mfu.peak_flops(devices, c.peak_tflops, config.model.compute_dtype)
        count = sum(x.size for x in jax.tree.leaves(self.plan.abstract["params"]))
        self.adapter_params = None  # LoRA: the adapters' size, for the step's FLOPs
        if spec.lora is not None:
            adapters, _ = optim.split(self.plan.abstract["params"], lora.is_adapter)
            self.adapter_params = sum(x.size for x in jax.tree.leaves(adapters))
        total = count + sum(x.size for x in jax.tree.leaves(self.plan.abstract["frozen"]))
        log.info("trainable parameters: %s of %s (%.2f%%)", f"{count:,}", f"{total:,}", 100 * count / total)

    def _cost(self, length: int) -> tuple[int, float]:
        """Tokens and training FLOPs of a step whose rows are ``length`` long."""
        tokens = self.config.train.batch_size * length
        flops = (
            mfu.flops_per_token(self.plan.spec.cfg, length, self.plan.objective.causal, self.adapter_params)
            * tokens
        )
        return tokens, flops

    @property
    def output_flops(self) -> float:
        """The output layer's FLOPs per token it is computed for (0 for a classifier)."""
        if not self.plan.objective.causal:
            return 0.0
        return mfu.output_layer_flops_per_token(self.plan.spec.cfg, self.adapter_params is not None)

    def _resume(self, ckpt, best: BestTracker) -> int:
        """The step the run starts from: that of the newest intact checkpoint (state, data position and
        best tracker restored), else 0."""
        abstract = {k: self.plan.abstract[k] for k in ("params", "frozen", "opt_state")}
        start, restored = ckpt.restore_latest(abstract)
        ckpt.rewind_best(start or 0)
        if not start:
            return 0
        step = jax.device_put(jnp.asarray(start, jnp.int32), self.plan.shardings["step"])
        self.state = {"params": restored["params"], "opt_state": restored["opt_state"], "step": step}
        self.frozen = restored["frozen"]
        self.batches.restore(restored["meta"]["data"])
        best.restore(restored["meta"].get("best", {}))
        log.info("resumed from %s at step %d", ckpt.dir, start)
        return start

    def train(self, stop_after: int | None = None) -> dict:
        config, cc = self.config, self.config.checkpoint
        ckpt = checkpoint.Checkpoints(
            self.workdir, cc.keep, cc.async_save, cc.best_metric, cc.best_mode, cc.best_keep
        )
        writer = bar = None
        try:
            best = BestTracker(cc.best_metric, cc.best_mode, config.eval.min_delta, config.eval.patience)
            start = self._resume(ckpt, best)
            writer = MetricsWriter(self.workdir, keep_until=start)  # later rows: the resumed run redoes them
            from tqdm.auto import tqdm

            bar = tqdm(
                total=self.total,
                initial=start,
                desc="train",
                disable=jax.process_index() != 0,
                dynamic_ncols=True,
            )
            parts = _Parts(self, ckpt, best, writer, bar)
            with activation_sharding(self.plan.mesh, self.plan.rules):
                summary = self._loop(start, stop_after, parts)
            bar.close()
        except BaseException:
            # Orbax's background save threads must not outlive a run that failed (a NaN, a full disk),
            # and the progress bar ends before the error is printed.
            if bar is not None:
                bar.close()
            ckpt.abandon()
            if writer is not None:
                writer.close()
            raise
        finally:
            self.batches.close()  # streaming's tokenizer processes
            hostmem.release()  # the steps' working memory back to the kernel: export and samples follow
        ckpt.wait()
        ckpt.close()
        writer.close()
        if summary.pop("finished"):
            finish.samples_and_export(
                config,
                self.workdir,
                self.plan.spec.graphdef,
                self.state["params"],
                self.frozen,
                self.tokenizer,
                self.plan.mesh,
                self.plan.rules,
            )
        return summary

    def _loop(self, start: int, stop_after, parts) -> dict:
        """Batch, step, hand the step to its parts; top to bottom."""
        summary, step, total = {"step": start}, start, self.total
        if self.config.eval.at_start and not start:
            parts.evaluate(0, summary)
        batch = parts.next_batch()
        parts.compiled(batch)
        parts.meter.restart()
        finished = start == total
        with StopSignals(self.config.train.stop_timeout_s, parts.ckpt.dir) as stop:
            while step < total:
                self.state, step_metrics = parts.compiled(batch)(self.state, self.frozen, batch)
                step += 1
                last = step == total
                signalled = stop.agreed()
                stopping = bool(signalled) or (stop_after is not None and step >= stop_after)
                save_now = parts.policy.due(step, stopping)
                eval_now = parts.evaluator is not None and parts.evaluator.due(step, last)
                parts.measure(step, step_metrics, batch, flush=save_now or eval_now)
                early = parts.evaluate(step, summary) if eval_now else False
                if save_now or early:
                    parts.save(step)
                if eval_now or save_now:
                    parts.meter.restart()  # an eval's or a save's time is not the next step's
                if early:
                    finished = True
                    break
                if stopping:
                    if signalled:
                        summary["stopped"] = signalled  # a caller (crossval) stops too
                    parts.ckpt.wait()  # inside the signal watch: a save that hangs can still be ended
                    log.info(
                        "stopped at step %d with a checkpoint; rerun on %s to continue", step, self.workdir
                    )
                    break
                if not last:
                    batch = parts.next_batch()
        if parts.meter.bar is not None:
            parts.meter.bar.close()  # before the last eval's and the end's log lines
        if step == total and not finished:
            parts.evaluate(step, summary)
        finished = finished or step == total
        if finished:
            self.state, self.frozen, best_step = finish.load_best(
                self.config, parts.ckpt, step, self.state, self.frozen, self.plan.abstract
            )
            if best_step is not None:
                summary["best_step"] = best_step
        if parts.meter.last is not None:
            summary["step"], summary["loss"] = parts.meter.last
        summary["step"] = max(summary["step"], step)
        summary["finished"] = finished
        return summary


class _Parts:
    """The loop's parts and the small glue between them and the run's state."""

    def __init__(self, run: Run, ckpt, best: BestTracker, writer, bar):
        self.run, self.ckpt, self.best = run, ckpt, best
        config = run.config
        self.policy = checkpoint.SavePolicy(config.checkpoint.every_steps, run.total)
        measured = mfu.peak_is_measured(config.train.peak_tflops)
        inline = hostmem.runs_inline(run.plan.mesh.devices)
        self.meter = StepMeter(
            run._cost,
            run.peak,
            config.train.log_every,
            run.total,
            writer,
            bar,
            measured=measured,
            inline=inline,
            output_flops=run.output_flops,
        )
        self.evaluator = evaluators.make(config, run.plan, run.eval_rows, run.labels, writer, run.workdir)
        self.finite = jax.jit(steps.all_finite)
        self.executables = {}  # by row length: one, unless data.pad_to_multiple_of cuts batches to their rows
        self.running = None  # the last step's metrics: a new compile waits for that step to end

    def next_batch(self) -> dict:
        run = self.run
        rows = run.config.train.batch_size
        return evaluators.device_batch(next(run.batches), run.plan.batch_sharding, rows)

    def compiled(self, batch: dict):
        """The train step compiled for this batch's row length, from the plan's declaration."""
        length = batch["input_ids"].shape[1]
        if length not in self.executables:
            self.run.plan.check_batch(batch)
            if self.running is not None:  # the step in flight ends first: its time is not the compile's
                jax.block_until_ready(self.running)
            t0 = time.perf_counter()
            self.executables[length] = self.run.plan.lower(length).compile()
            took = time.perf_counter() - t0
            self.meter.exclude(took)  # compilation is not a step's time
            log.info("train step compiled in %.1f s (rows of %d tokens)", took, length)
            self._keep_memory(self.executables[length])
        return self.executables[length]

    def _keep_memory(self, executable) -> None:
        """Where a step runs inside its dispatch (one CPU device), its working memory stays in the
        process between steps (train.keep_host_memory; jaxtune.hostmem)."""
        if not (self.run.config.train.keep_host_memory and self.meter.inline):
            return
        memory = executable.memory_analysis()
        if memory is not None:
            hostmem.keep(memory.temp_size_in_bytes)

    def measure(self, step: int, step_metrics, batch: dict, flush: bool) -> None:
        self.running = step_metrics
        try:
            self.meter.step(step, step_metrics, batch["input_ids"].shape[1], flush)
        except NonFiniteLoss as e:
            self._stop_bad(f"loss is {e.loss}", e.step)

    def evaluate(self, step: int, summary: dict) -> bool:
        """Eval metrics for ``step`` (offered to the best checkpoints); True: early stopping ends the run."""
        if self.evaluator is None:
            return False
        run = self.run
        values = self.evaluator(step, run.state["params"], run.frozen)
        summary["eval_loss"] = values["loss"]

        def offer(value):
            self.ckpt.offer_best(step, run.state, run.frozen, self.meta(step), value)

        return self.best.update(step, values, offer)

    def meta(self, step: int) -> dict:
        """What a checkpoint keeps beside the arrays: the data position and the best tracker."""
        frozen_paths = optim.paths(self.run.frozen)
        return {
            "step": step,
            "data": self.run.batches.state(),
            "frozen_paths": frozen_paths,
            "best": self.best.state(),
        }

    def save(self, step: int) -> None:
        if not bool(self.finite(self.run.state["params"])):
            self._stop_bad("the parameters are not finite", step)
        self.ckpt.save(step, self.run.state, self.run.frozen, self.meta(step))

    def _stop_bad(self, what: str, step: int):
        if self.meter.bar is not None:
            self.meter.bar.close()
        self.ckpt.wait()
        raise TrainingError(
            f"{what} at step {step}; stopping. The last good checkpoint is step {self.ckpt.latest()} in "
            f"{self.ckpt.dir}; lower optimizer.lr, raise optimizer.warmup_steps or check the data"
        )


def _merged(graphdef, state, frozen):
    return nnx.merge(graphdef, optim.merge(state["params"], frozen))


def main(argv=None) -> int:
    p = cli.parser("train", __doc__)
    cli.add_run_arguments(p)

    def body(args):
        return run(args.config, args.workdir)

    return cli.main(p, body, argv, with_config=True, multihost=True, trains=True)


if __name__ == "__main__":
    sys.exit(main())
