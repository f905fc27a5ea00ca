"""Pure training and evaluation steps, and the losses they use. No flags, no I/O: tests import them.

The train state is a dict of nested dicts of arrays: ``params`` (trainable), ``opt_state`` and
``step``. Frozen parameters travel separately and are never differentiated or updated.

A language-model batch is a dict: ``input_ids``, ``targets`` (the next token at each position),
``loss_mask`` (1 where the target counts), ``attention_mask``, and optionally ``segment_ids``. A
classification batch: ``input_ids``, ``attention_mask``, optionally ``token_type_ids``, ``labels``
(label ids) and ``weights`` (0 for the padding rows of the last eval batch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxtune.losses import IGNORE_INDEX, OutputOrder, causal_lm_loss, classification_loss
from jaxtune.models import heads
from jaxtune.models.layers import DEFAULT_OPTIONS, CallOptions, Dropout


def cast(tree, dtype):
    """Floating-point leaves in ``dtype`` (the compute dtype); gradients flow back to the master copy."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


class Objective:
    """What a task optimises: ``loss(model, batch) -> (summed loss, count)``, ``count(batch)`` (known
    before the forward pass), and ``eval_metrics(model, batch)`` (sums to add up over eval batches)."""

    def __init__(self, task, chunk_tokens: int, groups: int = 1):
        self.task, self.chunk_tokens, self.groups = task, chunk_tokens, groups  # groups: see causal_lm_loss
        self.causal = task.name == "causal_lm"
        if not self.causal and task.name != "sequence_classification":
            raise ValueError(f"training {task.name} is not supported yet")
        # Single-label losses average over examples; multi-label and regression ones over every output
        # of every example, as transformers' BCEWithLogitsLoss and MSELoss do.
        per_example = task.problem_type in ("multi_label_classification", "regression")
        self.outputs = task.num_labels if per_example else 1

    def count(self, batch):
        if self.causal:
            return jnp.sum(batch["loss_mask"].astype(jnp.float32))
        return jnp.sum(batch["weights"].astype(jnp.float32)) * self.outputs

    def output_tokens(self, batch):
        """How many of a causal batch's tokens the loss takes through the output layer (the rest, after
        the last token with a loss, are skipped: see losses.OutputOrder)."""
        return OutputOrder(batch["loss_mask"], self.chunk_tokens, self.groups).computed_tokens()

    def _logits(self, model, batch, dropout: Dropout | None = None, options: CallOptions = DEFAULT_OPTIONS):
        ids, mask, types = batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
        return model(ids, mask, types, dropout=dropout, options=options)

    def _classification_loss(self, logits, batch):
        if self.task.problem_type == "single_label_classification":
            labels = jnp.where(batch["weights"] > 0, batch["labels"], IGNORE_INDEX)
            return classification_loss(logits, labels, self.task.problem_type)
        return classification_loss(logits, batch["labels"], self.task.problem_type, batch["weights"])

    def loss(self, model, batch, dropout: Dropout | None = None, options: CallOptions = DEFAULT_OPTIONS):
        if self.causal:
            return causal_lm_loss(model, batch, self.chunk_tokens, dropout, options, self.groups)
        return self._classification_loss(self._logits(model, batch, dropout, options), batch)

    def eval_metrics(self, model, batch, options: CallOptions = DEFAULT_OPTIONS) -> dict:
        if self.causal:
            total, count = causal_lm_loss(
                model, batch, self.chunk_tokens, options=options, groups=self.groups
            )
            return {"loss_sum": total, "count": count}
        logits = self._logits(model, batch, options=options)
        total, count = self._classification_loss(logits, batch)
        # Per-example predictions come back too: F1, MCC, correlations and the confusion matrix need them.
        return {
            "loss_sum": total,
            "count": count,
            "predictions": heads.predictions(logits, self.task.problem_type),
            "labels": batch["labels"],
            "weights": batch["weights"],
        }


def micro_batches(batch, n: int):
    """Split a batch into ``n`` micro-batches along a new leading axis. Micro-batch a takes rows a, a+n,
    a+2n, ...: with rows sharded over devices in contiguous blocks, each micro-batch is spread over
    every device, so no data moves."""
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1), batch)


def make_train_step(
    graphdef,
    tx: optax.GradientTransformation,
    lr_schedule,
    *,
    compute_dtype,
    accum_steps: int,
    chunk_tokens: int = 1024,
    objective: Objective | None = None,
    dropout: float = 0.0,
    seed: int = 0,
    options: CallOptions = DEFAULT_OPTIONS,
    adapter_dropout: bool = False,
):
    """``train_step(state, frozen, batch) -> (state, metrics)``; pure, for ``jax.jit``.

    The token count of the whole batch is known before the forward pass (the loss mask), so each
    micro-batch's summed loss is divided by it up front: the gradients summed over ``accum_steps``
    micro-batches are then those of one step on the whole batch, with no pass to rescale them.

    With a ``dropout`` rate (or ``adapter_dropout``: LoRA adapters with their own rate), each step's
    masks come from ``seed``, the step number and the micro-batch.
    ``options``: remat and the attention implementation of the forward pass.
    """

    objective = objective or Objective(heads.CAUSAL_LM, chunk_tokens)

    def loss_fn(params, frozen, batch, denom, key):
        model = nnx.merge(graphdef, cast(params, compute_dtype), cast(frozen, compute_dtype))
        masks = Dropout(dropout, key) if dropout or adapter_dropout else None
        total, count = objective.loss(model, batch, masks, options)
        return total / denom, count

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, frozen, batch):
        params = state["params"]
        denom = jnp.maximum(objective.count(batch), 1.0)
        key = jax.random.fold_in(jax.random.key(seed), state["step"])

        def accumulate(carry, micro_index):
            grads, loss = carry
            micro, index = micro_index
            (part, _), g = grad_fn(params, frozen, micro, denom, jax.random.fold_in(key, index))
            return (jax.tree.map(jnp.add, grads, g), loss + part), None

        if accum_steps == 1:  # no accumulation buffers: one less pass over a model-sized tree
            (loss, _), grads = grad_fn(params, frozen, batch, denom, key)
        else:
            init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32))
            micros = (micro_batches(batch, accum_steps), jnp.arange(accum_steps))
            (grads, loss), _ = jax.lax.scan(accumulate, init, micros)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new = {
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
        }
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": lr_schedule(state["step"]),
            # The step's real tokens, padding left out: what tokens/s counts.
            "tokens": batch["attention_mask"].sum(dtype=jnp.float32),
        }
        if objective.causal:  # the output layer's share of the step's FLOPs (see meter.StepMeter)
            masks = micro_batches({"loss_mask": batch["loss_mask"]}, accum_steps)  # as the loss saw them
            metrics["output_tokens"] = jnp.sum(jax.vmap(objective.output_tokens)(masks)).astype(jnp.float32)
        return new, metrics

    return train_step


def make_eval_step(
    graphdef,
    *,
    compute_dtype,
    chunk_tokens: int = 1024,
    objective: Objective | None = None,
    options: CallOptions = DEFAULT_OPTIONS,
):
    """``eval_step(params, frozen, batch) -> dict``: the summed loss and its count, and for classifiers
    each row's prediction, label and weight (0 for the padding rows of the last batch)."""
    objective = objective or Objective(heads.CAUSAL_LM, chunk_tokens)

    def eval_step(params, frozen, batch):
        model = nnx.merge(graphdef, cast(params, compute_dtype), cast(frozen, compute_dtype))
        return objective.eval_metrics(model, batch, options)

    return eval_step


def all_finite(tree):
    """Whether every value of a tree is finite: checked before a checkpoint is written, so an update
    that overflowed is never saved."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
