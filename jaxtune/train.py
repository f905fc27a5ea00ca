"""Train a model.

    python -m jaxtune.train --config configs/X.py[:arg] [--config.KEY=VALUE ...] --workdir DIR

Config -> mesh -> model (loaded or created straight into its shards) -> data -> one jitted step in a
loop, with Orbax checkpoints in ``DIR/checkpoints`` (a rerun on the same DIR resumes), metrics in
``DIR/metrics.jsonl`` and TensorBoard files in DIR. SIGTERM (how TPU VMs are preempted) or Ctrl-C
finishes the current step, saves, and exits 0; a second one exits at once. One run at a time holds DIR.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune import checkpoint, cli, data, metrics, mfu, optim, plots, pretrained, sharding, steps
from jaxtune.config import validate
from jaxtune.data.classify import label_map
from jaxtune.data.loader import Batches, eval_batches
from jaxtune.errors import ConfigError, TrainingError
from jaxtune.models import presets
from jaxtune.stopping import StopSignals
from jaxtune.workdir import Lock
from jaxtune.writers import MetricsWriter

log = logging.getLogger("jaxtune.train")


def load_model(config, mesh, rules, labels=None):
    """The model of ``config.model.path`` (a preset name: random init) in ``param_dtype``, in its shards;
    a classifier gets ``labels`` (a :class:`jaxtune.data.classify.Labels`) as its id2label and
    problem_type."""
    c = config.model
    kwargs = dict(task=c.task, seed=config.train.seed, mesh=mesh, rules=rules)
    if labels is not None:
        kwargs["problem_type"] = labels.problem_type
        if labels.names:
            kwargs["id2label"] = list(labels.names)
        else:
            kwargs["num_labels"] = labels.num_labels
    if c.path in presets.PRESETS:
        model = pretrained.model_from_config(presets.hf_config(c.path), c.param_dtype, **kwargs)
    else:
        model = pretrained.load_pretrained(c.path, c.param_dtype, new_head=c.new_head, **kwargs)
    model.cfg = dataclasses.replace(model.cfg, remat=c.remat)
    return model


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


def _device_batch(batch: dict, shard) -> dict:
    return {k: jax.make_array_from_process_local_data(shard, v) for k, v in batch.items()}


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def run(config, workdir: str, stop_after: int | None = None, devices=None, labels=None) -> dict:
    """Train as ``config`` says, in ``workdir``; returns the last train and eval losses and the step.

    ``stop_after`` ends the run after that many steps in total (with a checkpoint), as a preemption
    would: a later run on the same workdir continues it. ``devices`` (default: all) carry the mesh.
    ``labels``: a classifier's label space (:class:`jaxtune.data.classify.Labels`) when it is not to be
    read from the training records (cross-validation fixes one for every fold).
    """
    devices = jax.devices() if devices is None else list(devices)
    validate(config, len(devices))
    # One run per workdir: a second one would interleave metrics and race the checkpoint saves.
    with Lock(workdir, enabled=jax.process_index() == 0):
        return _run(config, workdir, stop_after, devices, labels)


def _run(config, workdir: str, stop_after, devices, labels) -> dict:
    mesh = sharding.make_mesh(config, devices)
    rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in config.mesh.rules)
    tokenizer = load_tokenizer(config)
    if config.data.format == "classification" and labels is None:  # from the training split alone
        train_records = [r for group in data.train_groups(config.data) for r in group]
        labels = label_map(train_records, config.data.label_field, config.model.problem_type)
        log.info(
            "%s, %d label(s) from the training data: %s",
            labels.problem_type,
            labels.num_labels,
            ", ".join(labels.names) or "a value",
        )
    model = load_model(config, mesh, rules, labels)
    objective = steps.Objective(model.task, config.model.loss_chunk_tokens)
    cfg, c = model.cfg, config.train
    if model.cfg.vocab_size < len(tokenizer):
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary only {cfg.vocab_size}; "
            "use the model's own tokenizer (model.tokenizer) or a larger vocabulary"
        )

    train_rows, eval_rows = data.load(config.data, tokenizer, c.seed, labels)
    if jax.process_index() == 0:
        # Written once the model and the data are known to load, so a rerun that fails on either
        # leaves the files of the run before it as they were.
        pretrained.write_config(model, os.path.join(workdir, "model"), config.model.param_dtype, tokenizer)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    pid, nproc = jax.process_index(), jax.process_count()
    multiple = config.data.pad_to_multiple_of
    batches = Batches(
        train_rows, c.batch_size, c.seed, pid, nproc, weights=config.data.weights, pad_to_multiple_of=multiple
    )
    total = c.max_steps or c.num_epochs * batches.steps_per_epoch

    graphdef, state = nnx.split(model)
    shardings = sharding.state_shardings(state, mesh, rules)
    is_frozen = optim.frozen_matcher(config.optimizer.frozen)
    frozen, params = optim.split(nnx.to_pure_dict(state), is_frozen)
    frozen_sh, params_sh = optim.split(shardings, is_frozen)
    if not params:
        raise ConfigError(
            f"config key optimizer.frozen = {config.optimizer.frozen!r} freezes every parameter"
        )
    del model, state
    tx, lr_schedule = optim.make(config.optimizer, params, total, cfg.num_layers)
    state_sh = {
        "params": params_sh,
        "opt_state": sharding.like_params(jax.eval_shape(tx.init, params), params, params_sh, mesh),
        "step": sharding.replicated(mesh),
    }
    train_state = {
        "params": params,
        "opt_state": jax.jit(tx.init, out_shardings=state_sh["opt_state"])(params),
        "step": jax.device_put(jnp.zeros((), jnp.int32), state_sh["step"]),
    }
    batch_sh = sharding.batch_sharding(mesh, rules)
    compute = jnp.dtype(config.model.compute_dtype)
    step_fn = steps.make_train_step(
        graphdef,
        tx,
        lr_schedule,
        compute_dtype=compute,
        accum_steps=c.grad_accum_steps,
        objective=objective,
        dropout=config.model.dropout,
        seed=c.seed,
    )
    # state: sharded like the parameters and donated, since the old state is dead after the step;
    # frozen parameters: read only; batch: rows over (data, fsdp). Metrics come back replicated.
    train_step = jax.jit(
        step_fn,
        in_shardings=(state_sh, frozen_sh, batch_sh),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        steps.make_eval_step(graphdef, compute_dtype=compute, objective=objective),
        in_shardings=(params_sh, frozen_sh, batch_sh),
        out_shardings=sharding.replicated(mesh),
    )

    cc = config.checkpoint
    ckpt = checkpoint.Checkpoints(workdir, cc.keep, cc.async_save, cc.best_metric, cc.best_mode, cc.best_keep)
    writer = None
    bar = None
    try:
        # Early stopping follows one eval metric; its record survives a resume through meta.
        # value/step/bad: a gain must exceed eval.min_delta. The best-k ranking is the checkpoints'.
        best = {"value": None, "step": None, "bad": 0}
        abstract = {
            "params": _abstract(params),
            "frozen": _abstract(frozen),
            "opt_state": _abstract(train_state["opt_state"]),
        }
        start, restored = ckpt.restore_latest(abstract)
        start = start or 0
        ckpt.rewind_best(start)
        # Rows of steps after the checkpoint are dropped: the resumed run writes them again.
        writer = MetricsWriter(workdir, keep_until=start)
        if start:
            train_state = {
                "params": restored["params"],
                "opt_state": restored["opt_state"],
                "step": jax.device_put(jnp.asarray(start, jnp.int32), state_sh["step"]),
            }
            frozen = restored["frozen"]
            batches.restore(restored["meta"]["data"])
            best.update({k: v for k, v in restored["meta"].get("best", {}).items() if k in best})
            log.info("resumed from %s at step %d", ckpt.dir, start)

        eval_bs = config.eval.batch_size or c.batch_size

        def step_cost(length: int) -> tuple[int, float]:
            """Tokens and training FLOPs of a step whose rows are ``length`` long."""
            tokens = c.batch_size * length
            return tokens, mfu.flops_per_token(cfg, length, objective.causal) * tokens

        peak = mfu.peak_flops_per_device(c.peak_tflops) * len(devices)
        summary = {"step": start}
        extra_metrics = metrics.user_metrics(config.eval.metrics)

        def evaluate(step: int) -> bool:
            """Eval metrics for ``step``; True when early stopping says the run should end."""
            if eval_rows is None:
                return False
            sums: dict[str, float] = {}
            labels_seen, predicted = [], []
            for batch in eval_batches(eval_rows, eval_bs, config.eval.max_batches, pid, nproc, multiple):
                out = jax.device_get(eval_step(train_state["params"], frozen, _device_batch(batch, batch_sh)))
                if "predictions" in out:
                    keep = out.pop("weights") > 0  # not the padding rows of the last batch
                    labels_seen.append(out.pop("labels")[keep])
                    predicted.append(out.pop("predictions")[keep])
                for key, value in out.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
            loss = sums["loss_sum"] / max(sums["count"], 1.0)
            if predicted:
                y, p = np.concatenate(labels_seen), np.concatenate(predicted)
                values = {"loss": loss, **classifier_metrics(step, y, p)}
                count, unit = len(y), "examples"
            else:
                values = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
                count, unit = sums["count"], "tokens"
            writer.write(step, "eval", **values)
            shown = {k: v for k, v in values.items() if "/" not in k}
            log.info(
                "eval at step %d (%d %s): %s",
                step,
                count,
                unit,
                ", ".join(f"{k} {v:.4f}" for k, v in shown.items()),
            )
            summary["eval_loss"] = loss
            return follow_best(step, values)

        def classifier_metrics(step: int, y, p) -> dict:
            """Metrics by problem type (single-label: with the confusion matrix as JSON and PNG), and the
            user's metrics of eval.metrics."""
            scores = metrics.for_problem(labels.problem_type, y, p, labels.names, extra_metrics)
            if "confusion_matrix" not in scores:
                return scores
            matrix = scores.pop("confusion_matrix")
            if jax.process_index() == 0:
                with open(os.path.join(workdir, "confusion_matrix.json"), "w") as f:
                    json.dump({"step": step, "labels": list(labels.names), "matrix": matrix}, f)
                plots.confusion_png(
                    matrix,
                    labels.names,
                    os.path.join(workdir, "confusion_matrix.png"),
                    f"eval at step {step}",
                )
            return scores

        def follow_best(step: int, values: dict) -> bool:
            if not cc.best_metric:
                return False
            if cc.best_metric not in values:
                raise ConfigError(
                    f"config key checkpoint.best_metric = {cc.best_metric!r} is not an eval metric here; "
                    f"use one of {', '.join(sorted(values))}"
                )
            value, sign = values[cc.best_metric], 1.0 if cc.best_mode == "max" else -1.0
            if best["value"] is None or sign * (value - best["value"]) > config.eval.min_delta:
                best.update(value=value, step=step, bad=0)
            else:
                best["bad"] += 1
            if step:  # step 0 is the model before training: nothing to keep
                # Every eval is offered; the ranking keeps the best_keep best and names the best.
                ckpt.offer_best(step, train_state, frozen, meta(step), value)
            stop = bool(config.eval.patience) and best["bad"] >= config.eval.patience
            if stop:
                log.info(
                    "early stopping at step %d: %s has not improved on %.4f (step %s) for %d evals",
                    step,
                    cc.best_metric,
                    best["value"],
                    best["step"],
                    best["bad"],
                )
            return stop

        def stop_bad(what: str, step: int):
            bar.close()
            ckpt.wait()
            raise TrainingError(
                f"{what} at step {step}; stopping. The last good checkpoint is step {ckpt.latest()} in "
                f"{ckpt.dir}; lower optimizer.lr, raise optimizer.warmup_steps or check the data"
            )

        finite = jax.jit(steps.all_finite)

        def save(step: int) -> None:
            if not bool(finite(train_state["params"])):
                stop_bad("the parameters are not finite", step)
            ckpt.save(step, train_state, frozen, meta(step))

        def meta(step: int) -> dict:
            """What a checkpoint keeps beside the arrays: the data position and the best-metric record."""
            return {"step": step, "data": batches.state(), "frozen_paths": optim.paths(frozen), "best": best}

        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc="train", disable=pid != 0, dynamic_ncols=True)
        clock = [time.perf_counter()]

        def report(done: list) -> None:
            """Log the metrics of steps ``done`` [(step, metrics, row length)], the steps that ended since
            the clock was last read. Normally that is one step, fetched one step late so the device is
            never idle waiting. Before an eval or a save it is the last two: a backend that runs a step
            while dispatching it (the CPU) has already finished both, so their time is shared by FLOPs."""
            fetched = [(step, jax.device_get(m), length) for step, m, length in done]
            now = time.perf_counter()
            seconds, clock[0] = now - clock[0], now
            costs = [step_cost(length) for _, _, length in done]
            all_flops = sum(flops for _, flops in costs)
            for (step, m, _), (tokens, flops) in zip(fetched, costs, strict=True):
                loss = float(m["loss"])
                if not math.isfinite(loss):
                    stop_bad(f"loss is {loss}", step)
                took = seconds * flops / all_flops
                tps = tokens / took
                util = flops / took / peak if peak else 0.0
                summary.update(step=step, loss=loss)
                bar.update(step - bar.n)
                bar.set_postfix(
                    loss=f"{loss:.4f}",
                    lr=f"{float(m['learning_rate']):.2e}",
                    tok_s=f"{tps:.0f}",
                    mfu=f"{util:.1%}",
                )
                if step % c.log_every == 0 or step == total:
                    writer.write(
                        step,
                        "train",
                        loss=loss,
                        learning_rate=float(m["learning_rate"]),
                        tokens_per_second=tps,
                        mfu=util,
                        grad_norm=float(m["grad_norm"]),
                    )

        with sharding.activation_sharding(mesh, rules):
            if config.eval.at_start and not start:
                evaluate(0)
            executables = {}  # by row length: one, unless data.pad_to_multiple_of cuts batches to their rows

            def compiled_for(batch, running=None):
                length = batch["input_ids"].shape[1]
                if length not in executables:
                    if running is not None:  # the step in flight ends first: its time is not the compile's
                        jax.block_until_ready(running)
                    t0 = time.perf_counter()
                    executables[length] = train_step.lower(train_state, frozen, batch).compile()
                    took = time.perf_counter() - t0
                    clock[0] += took  # compilation is not a step's time
                    log.info("train step compiled in %.1f s (rows of %d tokens)", took, length)
                return executables[length]

            batch = _device_batch(next(batches), batch_sh)
            compiled_for(batch)
            clock[0] = time.perf_counter()
            pending, step = None, start
            finished = start == total
            with StopSignals(c.stop_timeout_s, ckpt.dir) as preempt:
                while step < total:
                    running = pending[1] if pending is not None else None
                    train_state, step_metrics = compiled_for(batch, running)(train_state, frozen, batch)
                    step += 1
                    current = (step, step_metrics, batch["input_ids"].shape[1])
                    last = step == total
                    save_now = last or (
                        config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0
                    )
                    eval_now = not last and config.eval.every_steps and step % config.eval.every_steps == 0
                    stop = preempt.requested or (stop_after is not None and step >= stop_after)
                    if save_now or eval_now or stop:
                        report([p for p in (pending, current) if p is not None])  # never checkpoint a NaN
                        pending = None
                    else:
                        if pending is not None:
                            report([pending])
                        pending = current
                    early = evaluate(step) if eval_now else False
                    if save_now or stop or early:
                        save(step)
                    if eval_now or save_now:
                        clock[0] = time.perf_counter()  # an eval's or a save's time is not the next step's
                    if early:
                        finished = True
                        break
                    if stop:
                        if preempt.requested:
                            summary["stopped"] = preempt.requested  # a caller (crossval) stops too
                        ckpt.wait()  # inside the signal watch: a save that hangs can still be ended
                        log.info(
                            "stopped at step %d with a checkpoint; rerun on %s to continue", step, workdir
                        )
                        break
                    if not last:
                        batch = _device_batch(next(batches), batch_sh)
            bar.close()
            if step == total and not finished:
                evaluate(step)
            finished = finished or step == total
            # The run ends on the best checkpoint when asked to, and so does the export unless it is told
            # to take the last one.
            end_on_best = cc.load_best_at_end or (config.export.at_end and config.export.checkpoint == "best")
            top = ckpt.best_step()
            if finished and end_on_best and top and top[0] != step:
                ckpt.wait()
                abstract = {"params": _abstract(train_state["params"]), "frozen": _abstract(frozen)}
                best_step = top[0]
                items = ckpt.restore_best(best_step, abstract)
                train_state = dict(train_state, params=items["params"])
                frozen = items["frozen"]
                log.info(
                    "loaded the best checkpoint (step %d, %s %.4f) for the end of the run",
                    best_step,
                    cc.best_metric,
                    top[1],
                )
                summary["best_step"] = best_step
    except BaseException:
        # Orbax's background save threads must not outlive a run that failed (a NaN, a full disk),
        # and the progress bar ends before the error is printed.
        if bar is not None:
            bar.close()
        ckpt.abandon()
        if writer is not None:
            writer.close()
        raise
    ckpt.wait()
    ckpt.close()
    writer.close()
    if finished:
        _finish(config, workdir, graphdef, train_state["params"], frozen, tokenizer)
    return summary


def _finish(config, workdir, graphdef, params, frozen, tokenizer) -> None:
    """Sample answers and the Hugging Face export, as the config asks."""
    if not (config.sample.prompts or config.export.at_end):
        return
    model = nnx.merge(graphdef, optim.merge(params, frozen))
    if config.sample.prompts and model.task.name == "causal_lm":
        from jaxtune.generate import generate

        chat = getattr(tokenizer, "chat_template", None) is not None
        with open(os.path.join(workdir, "samples.jsonl"), "w") as f:
            for prompt in config.sample.prompts:
                question = [{"role": "user", "content": prompt}] if chat else prompt
                answer = generate(model, tokenizer, question, max_new_tokens=config.sample.max_new_tokens)
                print(f"sample> {prompt}\n{answer}\n")
                f.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")
    if config.export.at_end and jax.process_index() == 0:
        out = os.path.join(workdir, "export")
        pretrained.save_pretrained(model, out, tokenizer=tokenizer, dtype=config.export.dtype or None)
        log.info("exported Hugging Face weights to %s", out)


def main(argv=None) -> int:
    p = cli.parser("train", __doc__)
    cli.add_run_arguments(p)
    return cli.main(p, lambda args: run(args.config, args.workdir), argv, with_config=True)


if __name__ == "__main__":
    sys.exit(main())
