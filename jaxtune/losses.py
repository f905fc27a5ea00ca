"""Losses, computed in float32 whatever the compute dtype.

Each returns ``(sum, count)`` rather than a mean, so gradient accumulation over micro-batches can
divide once by the total count and weigh every example (or token) equally; ``sum / count`` is the
mean transformers reports.
"""

from __future__ import annotations

import functools
import math

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


def causal_lm_loss(model, batch, chunk_tokens: int, dropout=None, options=DEFAULT_OPTIONS, groups: int = 1):
    """Summed next-token cross-entropy and the number of counted tokens.

    The output layer and the loss run over chunks of ``chunk_tokens`` tokens (:func:`chunked_nll`), so
    at most one chunk of float32 logits ``[chunk, vocab]`` exists at a time, forward or backward. The
    tokens with a loss go first (:class:`OutputOrder`), so a chunk of tokens without one (an SFT
    batch's prompts) is skipped. ``groups``: the shards of the batch's rows; tokens are only reordered
    within a group of rows, so a device's tokens stay on it.
    """
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    x_btd = model.hidden_states(batch["input_ids"], **inputs, dropout=dropout, options=options)
    b, t, d = x_btd.shape
    layout = OutputOrder(batch["loss_mask"], chunk_tokens, groups)
    w, names = model.output_weights()
    weights = layout.chunks(batch["loss_mask"].astype(jnp.float32))
    total = chunked_nll(
        model.logits_with, names, w, layout.chunks(x_btd), layout.chunks(batch["targets"]), weights
    )
    return total, jnp.sum(weights)


class OutputOrder:
    """Where each token of a batch goes in the output layer's chunks: within each of ``groups``
    groups of rows (a device's rows), the tokens with a loss (``loss_mask``) first, in their order,
    then the rest; a chunk takes ``chunk_tokens`` consecutive tokens of every group. In an SFT batch, where
    only the answers carry a loss (a quarter to a third of the tokens of the chat data of
    benchmarks/README.md), the chunks after the last token with a loss hold none, and
    :func:`chunked_nll` skips them: the vocabulary-sized products of those tokens are never
    computed. A batch where every token has a loss keeps its order."""

    def __init__(self, loss_mask_bt, chunk_tokens: int, groups: int = 1):
        b, t = loss_mask_bt.shape
        self.groups = math.gcd(max(int(groups), 1), b)
        self.per = max(1, min(chunk_tokens, b * t // self.groups))  # a group's tokens in one chunk
        # A group is one device's rows (named "batch" like the rows): the sort and the gathers stay on it.
        keep = constrain(loss_mask_bt.reshape(self.groups, -1) > 0, ("batch", None))
        self.order = jnp.argsort(~keep, axis=1, stable=True)  # [groups, tokens of a group]
        self.inverse = jnp.argsort(self.order, axis=1)  # where each token went: the gradient's way back
        self.loss_mask_bt = loss_mask_bt

    def chunks(self, a_bt):
        """``a_bt`` [b, t, ...] reordered and cut into chunks: [chunks, chunk tokens, ...]."""
        g, m = self.order.shape
        rest = (None,) * (a_bt.ndim - 2)
        a = constrain(a_bt.reshape(g, m, *a_bt.shape[2:]), ("batch", None, *rest))
        a = _permute(a, self.order, self.inverse)
        a = jnp.pad(a, ((0, 0), (0, -m % self.per)) + ((0, 0),) * len(rest))
        a = a.reshape(g, -1, self.per, *a.shape[2:])
        a = jnp.swapaxes(a, 0, 1).reshape(-1, g * self.per, *a.shape[3:])
        return constrain(a, (None, "batch", *rest))

    def computed_tokens(self):
        """How many of the batch's tokens go through the output layer: those of the chunks
        :func:`chunked_nll` runs over (:func:`chunks_used`), the padding of the last chunk not counted."""
        g, m = self.order.shape
        used = chunks_used(self.chunks(self.loss_mask_bt.astype(jnp.float32))) * self.per
        return g * jnp.minimum(used, m)


@jax.custom_vjp
def _permute(a_gm, order_gm, inverse_gm):
    """``a_gm`` [g, m, ...] reordered along m by ``order_gm``. Its gradient goes back by the inverse
    order, a gather like the forward's: autodiff's scatter-add does not know the indices are a
    permutation (on a GPU, atomic adds)."""
    return _gather(a_gm, order_gm)


def _gather(a_gm, index_gm):
    return jnp.take_along_axis(a_gm, index_gm.reshape(*index_gm.shape, *(1,) * (a_gm.ndim - 2)), axis=1)


_permute.defvjp(
    lambda a, order, inverse: (_gather(a, order), inverse),
    lambda inverse, d_gm: (_gather(d_gm, inverse), None, None),
)


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
    skipped when ``w`` is not trained (a LoRA run's frozen head). Chunks after the last one with a
    nonzero weight are skipped (the loop ends there: no products at all), which :class:`OutputOrder`
    arranges for the tokens without a loss. The loop has no branch in it: XLA then moves the
    weight gradient's cross-device sum out of the loop, once per step instead of once per chunk.
    """

    def body(i, total):
        return total + _nll(logits_fn, w, x_ncd[i], targets_nc[i], weights_nc[i])

    return jax.lax.fori_loop(0, chunks_used(weights_nc), body, jnp.zeros((), jnp.float32))


def chunks_used(weights_nc):
    """The chunks up to the last one with a nonzero weight: the ones the loss runs over."""
    used = jnp.any(weights_nc != 0, axis=1)
    return jnp.max(jnp.where(used, jnp.arange(1, used.shape[0] + 1), 0))


def _chunked_nll_fwd(logits_fn, w_names, w, x_ncd, targets_nc, weights_nc):
    trains_w = w.perturbed
    w, x_ncd, targets_nc, weights_nc = w.value, x_ncd.value, targets_nc.value, weights_nc.value
    # The chunks' gradients are taken for the mean over the counted tokens, not the sum, as the train
    # step's own 1/tokens would scale them: a float16 sum over thousands of tokens can overflow.
    count = jnp.maximum(jnp.sum(weights_nc), 1.0)

    def body(i, carry):
        total, dw, dx_ncd = carry
        x_cd, target_c, weight_c = x_ncd[i], targets_nc[i], weights_nc[i]
        if trains_w:
            loss, grad = jax.vjp(lambda w, x: _nll(logits_fn, w, x, target_c, weight_c), w, x_cd)
            dw_c, dx_cd = grad(1.0 / count)
            dw = dw + dw_c.astype(acc)  # summed over chunks in float32 at least
        else:
            loss, grad = jax.vjp(lambda x: _nll(logits_fn, w, x, target_c, weight_c), x_cd)
            (dx_cd,) = grad(1.0 / count)
        return total + loss, dw, dx_ncd.at[i].set(dx_cd)

    acc = jnp.promote_types(jnp.float32, w.dtype)
    # The gradient is summed sharded like the weight (a 128k-vocabulary head's is GBs).
    dw0 = constrain(jnp.zeros(w.shape, acc), w_names) if trains_w else jnp.zeros((), acc)
    dx0 = constrain(jnp.zeros_like(x_ncd), (None, "batch", None))  # skipped chunks: no gradient
    init = (jnp.zeros((), jnp.float32), dw0, dx0)
    total, dw, dx_ncd = jax.lax.fori_loop(0, chunks_used(weights_nc), body, init)
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
