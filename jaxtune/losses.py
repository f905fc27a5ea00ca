"""Losses, computed in float32 whatever the compute dtype.

Each returns ``(sum, count)`` rather than a mean, so gradient accumulation over micro-batches can
divide once by the total count and weigh every example (or token) equally; ``sum / count`` is the
mean transformers reports.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxtune.logical import constrain
from jaxtune.models.layers import DEFAULT_OPTIONS

MODEL_INPUTS = ("attention_mask", "position_ids", "segment_ids")  # the batch fields a decoder reads
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


def causal_lm_loss(model, batch, chunk_tokens: int, dropout=None, options=DEFAULT_OPTIONS):
    """Summed next-token cross-entropy and the number of counted tokens.

    The output layer and the loss run over chunks of ``chunk_tokens`` tokens (:func:`chunked_nll`), so
    at most one chunk of float32 logits ``[chunk, vocab]`` exists at a time, forward or backward.
    """
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    x_btd = model.hidden_states(batch["input_ids"], **inputs, dropout=dropout, options=options)
    b, t, d = x_btd.shape
    n = b * t
    chunk = min(chunk_tokens, n)
    pad = -n % chunk
    x_nd = jnp.pad(x_btd.reshape(n, d), ((0, pad), (0, 0))).reshape(-1, chunk, d)
    targets = jnp.pad(batch["targets"].reshape(n), (0, pad)).reshape(-1, chunk)
    weights = jnp.pad(batch["loss_mask"].reshape(n).astype(jnp.float32), (0, pad)).reshape(-1, chunk)
    w, names = model.output_weights()
    total = chunked_nll(model.logits_with, names, w, x_nd, targets, weights)
    return total, jnp.sum(weights)


def _nll(logits_fn, w, x_cd, target_c, weight_c):
    logits = logits_fn(w, x_cd[None])[0].astype(jnp.float32)
    picked = jnp.take_along_axis(logits, target_c[:, None], axis=-1)[:, 0]
    return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - picked) * weight_c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def chunked_nll(logits_fn, w_names, w, x_ncd, targets_nc, weights_nc):
    """The weighted next-token NLL summed over chunks: ``logits_fn(w, x[None])`` gives a chunk's logits
    ``[1, chunk, vocab]`` through the output weight ``w`` (logical axis names ``w_names``).

    Differentiated, each chunk's gradients (for ``x`` and ``w``) are computed in the forward pass,
    right after its loss, while its logits exist: the incoming gradient of a summed loss is one
    number, which the backward pass only multiplies in. Recomputing each chunk's logits on the way
    back instead (``jax.checkpoint``) cost one more vocabulary-sized product per chunk: 1.7 s of a
    SmolLM2 step of 8 x 512 tokens on a 2-core CPU (benchmarks/README.md). The weight's gradient is
    skipped when ``w`` is not trained (a LoRA run's frozen head).
    """

    def body(total, xs):
        return total + _nll(logits_fn, w, *xs), None

    return jax.lax.scan(body, jnp.zeros((), jnp.float32), (x_ncd, targets_nc, weights_nc))[0]


def _chunked_nll_fwd(logits_fn, w_names, w, x_ncd, targets_nc, weights_nc):
    trains_w = w.perturbed
    w, x_ncd, targets_nc, weights_nc = w.value, x_ncd.value, targets_nc.value, weights_nc.value
    # The chunks' gradients are taken for the mean over the counted tokens, not the sum, as the train
    # step's own 1/tokens would scale them: a float16 sum over thousands of tokens can overflow.
    count = jnp.maximum(jnp.sum(weights_nc), 1.0)

    def body(carry, xs):
        total, dw = carry
        x_cd, target_c, weight_c = xs
        if trains_w:
            loss, grad = jax.vjp(lambda w, x: _nll(logits_fn, w, x, target_c, weight_c), w, x_cd)
            dw_c, dx_cd = grad(1.0 / count)
            dw = dw + dw_c.astype(acc)  # summed over chunks in float32 at least
        else:
            loss, grad = jax.vjp(lambda x: _nll(logits_fn, w, x, target_c, weight_c), x_cd)
            (dx_cd,) = grad(1.0 / count)
        return (total + loss, dw), dx_cd

    acc = jnp.promote_types(jnp.float32, w.dtype)
    # The gradient is summed sharded like the weight (a 128k-vocabulary head's is GBs).
    dw0 = constrain(jnp.zeros(w.shape, acc), w_names) if trains_w else jnp.zeros((), acc)
    init = (jnp.zeros((), jnp.float32), dw0)
    (total, dw), dx_ncd = jax.lax.scan(body, init, (x_ncd, targets_nc, weights_nc))
    # dw stays in its float32 accumulator until the backward pass scales it; the empty array carries
    # the weight's dtype there.
    return total, ((dw, jnp.zeros((0,), w.dtype)) if trains_w else None, dx_ncd, count)


def _chunked_nll_bwd(logits_fn, w_names, residuals, g):
    if isinstance(g, jax.custom_derivatives.SymbolicZero):  # the loss is not used: nothing flows back
        return None, None, None, None
    dw, dx_ncd, count = residuals
    g = g * count  # the forward pass took the gradients of the mean
    return (
        None if dw is None else (dw[0] * g).astype(dw[1].dtype),  # rounded to the weight's dtype once
        (dx_ncd * g).astype(dx_ncd.dtype),
        None,
        None,
    )


chunked_nll.defvjp(_chunked_nll_fwd, _chunked_nll_bwd, symbolic_zeros=True)
