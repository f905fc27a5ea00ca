"""Losses, computed in float32 whatever the compute dtype.

Each returns ``(sum, count)`` rather than a mean, so gradient accumulation over micro-batches can
divide once by the total count and weigh every example (or token) equally; ``sum / count`` is the
mean transformers reports.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100  # label of positions without a loss (padding, sub-word continuations), as in transformers


def classification_loss(logits, labels, problem_type: str, weights=None):
    """Loss of a classification head, by ``problem_type`` as transformers defines it.

    single_label_classification: cross-entropy; ``labels`` are ids ``[b]`` (or ``[b, t]`` for token
    classification), and ids equal to -100 carry no loss. multi_label_classification: binary
    cross-entropy with logits over every output; ``labels`` are 0/1 ``[b, labels]``. regression: squared
    error; ``labels`` are ``[b]`` for one output, else ``[b, labels]``. ``weights`` ``[b]`` (multi-label
    and regression; single-label uses -100 labels) scale each example, 0 leaving it out of the sum and
    the count.
    """
    logits = jnp.asarray(logits, jnp.float32)
    labels = jnp.asarray(labels)
    if problem_type == "single_label_classification":
        keep = labels != IGNORE_INDEX
        safe = jnp.where(keep, labels, 0)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(keep, nll, 0.0)), jnp.sum(keep)
    labels = labels.astype(jnp.float32)
    if problem_type == "multi_label_classification":
        # log(1 + exp(-|x|)) form: stable for large logits of either sign.
        per = jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    elif problem_type == "regression":
        if logits.shape[-1] == 1 and labels.ndim == logits.ndim - 1:
            logits = logits[..., 0]
        per = jnp.square(logits - labels)
    else:
        raise ValueError(
            f"problem_type {problem_type!r} is not one of single_label_classification, "
            "multi_label_classification, regression"
        )
    if weights is None:
        return jnp.sum(per), per.size
    w = jnp.asarray(weights, jnp.float32).reshape(per.shape[:1] + (1,) * (per.ndim - 1))
    return jnp.sum(per * w), jnp.sum(w) * (per.size // per.shape[0])
