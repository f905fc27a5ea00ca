"""Operations whose backward pass is written out rather than left to autodiff, for XLA's CPU backend.

Autodiff's backward passes are right, and on accelerators as fast as the forward's; on the CPU the
way XLA lays out and fuses some of them cost several times the product they belong to, and the
residuals autodiff keeps cost memory traffic (measured in benchmarks/README.md). Each operation here
computes the forward of the expression in its docstring and autodiff's gradients of it
(tests/test_performance.py: to float32 rounding; in 16-bit floats, the MLP activations' slopes are
computed in float32 and rounded once), arranged so that every large array is read in the order it is
stored and the fewest arrays are kept for the backward pass. Accelerators get the same code: the
arrangement is neutral there.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dense(x, w, n_in: int, out_dtype=None):
    """``x`` [..., in...] times ``w`` [in..., out...]: the last ``n_in`` dimensions of ``x`` contracted
    with the first ``n_in`` of ``w``; ``out_dtype``: the accumulation and output dtype (None: the
    inputs', accumulated in float32 for fewer than :data:`FEW_ROWS` rows of 16-bit floats). The same
    product as ``jax.lax.dot_general``, with the backward pass written out (a bfloat16 product widened
    by ``out_dtype`` takes its gradient in bfloat16: see ``_dense_bwd``)."""
    return _dense(x, w, n_in, out_dtype)


FEW_ROWS = 128  # see _dense


def _dense(x, w, n_in, out_dtype):
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    acc, out = out_dtype, None
    half = x.dtype == w.dtype and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4
    if out_dtype is None and half and math.prod(x.shape[: x.ndim - n_in]) < FEW_ROWS:
        # A product of few rows in 16-bit floats (a decode step's) is accumulated in float32 and
        # rounded once: XLA's CPU kernels for a bfloat16 result run 3-5x slower there than for a
        # float32 one (benchmarks/README.md). The two are about even at 128 rows, and from 256 rows on
        # (training) the bfloat16 result is the faster; accelerators accumulate in float32 either way.
        acc, out = jnp.float32, x.dtype
    y = jax.lax.dot_general(x, w, (contract, ((), ())), preferred_element_type=acc)
    return y if out is None else y.astype(out)


def _dense_fwd(x, w, n_in, out_dtype):
    return _dense(x, w, n_in, out_dtype), (x, w)


def _dense_bwd(n_in, out_dtype, residuals, dy):
    # Autodiff's weight gradient contracts the batch dimensions of x and dy in place, and XLA's CPU
    # backend then lays dy out transposed, fusing the elementwise work that made it (an activation's
    # backward) into a strided loop that ran 3-10x slower than the product itself. Transposing x, a
    # plain copy of a saved input, makes it an ordinary [in, tokens] x [tokens, out] product. x goes
    # in as a matrix [tokens, in]: XLA's CPU backend then reads it transposed inside the product
    # instead of copying it transposed out of the scan's stack first (benchmarks/README.md). dy keeps
    # its output axes, so a tensor-parallel heads axis inside a fused qkv's (3, heads, head_dim)
    # stays an axis of its own for the partitioner.
    x, w = residuals
    lead = x.ndim - n_in
    if out_dtype is not None and x.dtype == w.dtype == jnp.bfloat16 and dy.dtype != x.dtype:
        # A widened product (bfloat16 inputs, float32 logits): its gradient comes back in float32, and
        # a float32 x bfloat16 product runs as a float32 one (TF32 on an NVIDIA GPU, half the bfloat16
        # rate: a fifth of a 1B Llama's step in its output layer). The cotangent goes to bfloat16
        # instead, as mixed-precision training does; it keeps float32's exponent range, so the small
        # per-token gradients of the mean loss do not flush to zero (float16's would: float16 keeps
        # the float32 cotangent). The results are asked for in bfloat16 too, which GPUs and TPUs
        # accumulate in float32 anyway (XLA's CPU backend lacks some bfloat16 products with a float32
        # result). So for this case the gradients equal autodiff's up to bfloat16 rounding of dy.
        dy, out_dtype = dy.astype(x.dtype), None
    dx = jax.lax.dot_general(
        dy,
        w,
        ((tuple(range(lead, dy.ndim)), tuple(range(n_in, w.ndim))), ((), ())),
        preferred_element_type=out_dtype,
    )
    rows = math.prod(x.shape[:lead])
    x_t = x.reshape(rows, math.prod(x.shape[lead:])).T
    dy_rows = dy.reshape(rows, *dy.shape[lead:])
    dw = jax.lax.dot_general(x_t, dy_rows, (((1,), (0,)), ((), ())), preferred_element_type=out_dtype)
    return dx.astype(x.dtype), dw.reshape(w.shape).astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


def _token_sum(dy, shape, dtype):
    """``dy`` summed over its leading axes down to ``shape`` (its trailing axes), as a matrix-vector
    product with ones: the gradient of a bias or a norm's scale."""
    # XLA's CPU backend ran this reduction over every token (fused with its elementwise input) at a
    # fraction of memory speed: 7 ms a layer at 1024 tokens of SmolLM2. As a matrix-vector product
    # with ones it runs at memory speed.
    rows = dy.reshape(-1, math.prod(shape))
    ones = jnp.ones((rows.shape[0],), rows.dtype)
    return jnp.dot(ones, rows, preferred_element_type=jnp.float32).reshape(shape).astype(dtype)


@jax.custom_vjp
def add_features(x, b):
    """``x + b``: ``x`` [..., f...] plus a bias ``b`` [f...] (its trailing axes) of the same dtype."""
    return x + b


add_features.defvjp(lambda x, b: (x + b, b), lambda b, dy: (dy, _token_sum(dy, b.shape, b.dtype)))


# The norms below keep their input and its statistics for the backward pass, and recompute the
# normalised activations there. Autodiff kept two arrays as large as the input: the centred input
# (or the input) for the statistics' gradient and the normalised activations for the scale's; in
# the scan's stacks each is written in the forward pass and read back in the backward one, which on
# the CPU cost more than recomputing them (benchmarks/README.md).


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, w, b, eps: float):
    """LayerNorm over the last axis, in float32 whatever ``x``'s dtype: ``(x - mean) / sqrt(var + eps)
    * w + b``, cast back to ``x``'s dtype, with autodiff's gradients."""
    return _layer_norm_fwd(x, w, b, eps)[0]


def _layer_normed(x, mean, rstd):
    return (x.astype(jnp.float32) - mean) * rstd


def _layer_norm_fwd(x, w, b, eps):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.square(x32 - mean).mean(-1, keepdims=True) + eps)
    y = _layer_normed(x, mean, rstd) * w.astype(jnp.float32) + b.astype(jnp.float32)
    return y.astype(x.dtype), (x, mean, rstd, w, b)


def _layer_norm_bwd(eps, residuals, dy):
    x, mean, rstd, w, b = residuals
    normed = _layer_normed(x, mean, rstd)
    d = dy.astype(jnp.float32)
    g = d * w.astype(jnp.float32)
    dx = rstd * (g - g.mean(-1, keepdims=True) - normed * (g * normed).mean(-1, keepdims=True))
    return dx.astype(x.dtype), _token_sum(d * normed, w.shape, w.dtype), _token_sum(d, b.shape, b.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x, w, eps: float):
    """RMSNorm over the last axis as Llama computes it: ``x / sqrt(mean(x^2) + eps)`` in float32, cast
    back to ``x``'s dtype, then times ``w`` (of that dtype), with autodiff's gradients."""
    return _rms_norm_fwd(x, w, eps)[0]


def _rms_normed(x, rstd):
    return x.astype(jnp.float32) * rstd


def _rms_norm_fwd(x, w, eps):
    rstd = jax.lax.rsqrt(jnp.square(x.astype(jnp.float32)).mean(-1, keepdims=True) + eps)
    return _rms_normed(x, rstd).astype(x.dtype) * w, (x, rstd, w)


def _rms_norm_bwd(eps, residuals, dy):
    x, rstd, w = residuals
    normed = _rms_normed(x, rstd)
    g = (dy * w).astype(jnp.float32)
    dx = rstd * (g - normed * (g * normed).mean(-1, keepdims=True))
    return dx.astype(x.dtype), _token_sum(dy * normed.astype(x.dtype), w.shape, w.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


_SQRT_HALF = math.sqrt(0.5)
_TANH_C, _TANH_A = math.sqrt(2 / math.pi), 0.044715  # the tanh approximation's constants


def _gelu(x):  # erf's GELU as torch writes it (XLA's CPU backend fuses erf into a product; not erfc)
    return 0.5 * x * (1.0 + jax.lax.erf(x * _SQRT_HALF))


def _gelu_slope(x):  # Phi(x) + x phi(x)
    density = (_SQRT_HALF / math.sqrt(math.pi)) * jnp.exp(-0.5 * x * x)
    return 0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF)) + x * density


def _tanh_of_cubic(x):  # the tanh approximation's tanh(sqrt(2 / pi) (x + 0.044715 x^3))
    return jnp.tanh(_TANH_C * (x + _TANH_A * x**3))


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + _tanh_of_cubic(x))


def _gelu_tanh_slope(x):
    t = _tanh_of_cubic(x)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _TANH_C * (1.0 + 3 * _TANH_A * x * x)


def _silu_slope(x):
    s = jax.nn.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


# name -> (function, its derivative): the MLPs' activations (layers.activation_name maps Hugging
# Face's names to these).
_ACTIVATIONS = {
    "gelu": (_gelu, _gelu_slope),
    "gelu_tanh": (_gelu_tanh, _gelu_tanh_slope),
    "silu": (jax.nn.silu, _silu_slope),
    "relu": (jax.nn.relu, lambda x: (x > 0).astype(x.dtype)),
}


def _hidden(up, gate, name):
    """An MLP's hidden state: ``activation(up)``, or with a ``gate`` ``activation(gate) * up``."""
    f = _ACTIVATIONS[name][0]
    return f(up) if gate is None else f(gate) * up


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def activation(x, name: str):
    """An MLP's activation of ``x``: ``gelu`` ``0.5 x (1 + erf(x / sqrt(2)))``, ``gelu_tanh`` (its tanh
    approximation, ``jax.nn.gelu(approximate=True)``), ``silu`` or ``relu``. Its backward pass keeps
    only ``x`` and computes the slope from it, in float32."""
    return _hidden(x, None, name)


def _activation_fwd(x, name):
    return activation(x, name), x


def _activation_bwd(name, x, dy):
    # Autodiff keeps the forward's intermediate arrays (erfc's, exp's) as residuals, each as large as
    # x: a layer of MiniLM wrote four [tokens, 1536] arrays for its GELU, and XLA's CPU backend then
    # fused the GELU's recomputation into the transposed copy of the down projection's input, a
    # strided loop that took longer than the MLP's products. One saved input and an elementwise slope
    # read row-major instead.
    slope = _ACTIVATIONS[name][1](x.astype(jnp.float32))
    return ((dy.astype(jnp.float32) * slope).astype(x.dtype),)


activation.defvjp(_activation_fwd, _activation_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def gated(gate, up, name: str):
    """A gated MLP's hidden state, ``activation(gate, name) * up``, with a backward pass that keeps only
    ``gate`` and ``up`` (autodiff would also keep the activation's output and its intermediates)."""
    return _hidden(up, gate, name)


def _gated_fwd(gate, up, name):
    return gated(gate, up, name), (gate, up)


def _gated_bwd(name, residuals, dy):
    gate, up = residuals
    f, slope = _ACTIVATIONS[name]
    g, u, d = gate.astype(jnp.float32), up.astype(jnp.float32), dy.astype(jnp.float32)
    return (d * u * slope(g)).astype(gate.dtype), (d * f(g)).astype(up.dtype)


gated.defvjp(_gated_fwd, _gated_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def mlp_down(up, gate, w, name: str):
    """An MLP's down projection of its hidden state: ``dense(activation(up, name), w, 1)``, or with a
    ``gate`` ``dense(gated(gate, up, name), w, 1)``. The same values and gradients as those two
    operations in turn, but the hidden state is not kept for the backward pass: it is recomputed there
    from ``up`` (and ``gate``), which are kept anyway for the activation's slope."""
    return _dense(_hidden(up, gate, name), w, 1, None)


def _mlp_down_fwd(up, gate, w, name):
    return mlp_down(up, gate, w, name), (up, gate, w)


def _mlp_down_bwd(name, residuals, dy):
    # Keeping the hidden state cost one more [tokens, intermediate] array a layer in the scan's
    # stacks, written in the forward pass and read back here (the largest residual of a layer with
    # an ungated MLP): recomputing it, elementwise, is cheaper on the CPU (benchmarks/README.md).
    up, gate, w = residuals
    d_hidden, dw = _dense_bwd(1, None, (_hidden(up, gate, name), w), dy)
    if gate is None:
        return _activation_bwd(name, up, d_hidden)[0], None, dw
    d_gate, d_up = _gated_bwd(name, (gate, up), d_hidden)
    return d_up, d_gate, dw


mlp_down.defvjp(_mlp_down_fwd, _mlp_down_bwd)


# A large finite value rather than -inf keeps fully masked (padding) rows free of NaN.
MASKED = float(np.finfo(np.float32).min)


def _heads_first(q_btnh, k_bskh, v_bskh):
    """q [b, k, g, t, h], k and v [b, k, s, h]: the layout in which every product below is an ordinary
    batched matrix product."""
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2]
    q = q_btnh.reshape(b, t, k, n // k, h).transpose(0, 2, 3, 1, 4)
    return q, k_bskh.transpose(0, 2, 1, 3), v_bskh.transpose(0, 2, 1, 3)


def _probabilities(q, k, mask_bts, scale, stats=None):
    """Softmax of the masked scores [b, k, g, t, s] and its row statistics (max, sum); given the
    statistics of an earlier call, the same probabilities, recomputed by the same operations."""
    scores = jnp.einsum("bkgth,bksh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask_bts[:, None, None], scores, MASKED)
    top, total = stats if stats is not None else (jnp.max(scores, axis=-1, keepdims=True), None)
    unnormalised = jnp.exp(scores - top)
    if total is None:
        total = jnp.sum(unnormalised, axis=-1, keepdims=True)
    return unnormalised / total, (top, total)


def _attention_fwd(q_btnh, k_bskh, v_bskh, mask_bts, scale):
    q, k, v = _heads_first(q_btnh, k_bskh, v_bskh)
    probs, stats = _probabilities(q, k, mask_bts, scale)
    out = jnp.einsum("bkgts,bksh->bkgth", probs.astype(v.dtype), v)
    b, t, n, h = q_btnh.shape
    # The [t, s] probabilities are not kept for the backward pass (at 1024 tokens they are 38 MB a
    # layer, and writing and reading them back cost more than recomputing them): only their rows' max
    # and sum, from which the backward pass recomputes them exactly.
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h), (q, k, v, mask_bts, stats, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention(q_btnh, k_bskh, v_bskh, mask_bts, scale):
    """Masked softmax attention (the reference's math) with the backward pass written out."""
    return _attention_fwd(q_btnh, k_bskh, v_bskh, mask_bts, scale)[0]


def _attention_bwd(scale, residuals, d_out_btnh):
    # Autodiff's key and value gradients contract the query axis of the [t, s] probabilities, and XLA's
    # CPU backend then lays the probabilities' gradient out transposed, fused into a strided loop: at
    # 1024 tokens that made attention's backward several times its forward. Here the [t, s] arrays
    # are only ever read row-major; the small q, k, v and output gradients are transposed instead.
    q, k, v, mask_bts, stats, out = residuals
    b, kv, g, t, h = q.shape
    s = k.shape[2]
    d_out = d_out_btnh.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4)  # [b, k, g, t, h]
    rows = (b, kv, g * t)  # the g query heads of a key/value head, one after the other

    def over_queries(x_bkgth, y_bkgts):  # sum over g and t of x^T y: [b, k, h, s]
        x = x_bkgth.transpose(0, 1, 4, 2, 3).reshape(b, kv, h, g * t)
        return jnp.einsum("bkhx,bkxs->bkhs", x, y_bkgts.reshape(*rows, s))

    probs, _ = _probabilities(q, k, mask_bts, scale, stats)
    dv = over_queries(d_out, probs.astype(v.dtype)).transpose(0, 3, 1, 2)  # [b, s, k, h]
    d_probs = jnp.einsum("bkgth,bksh->bkgts", d_out, v, preferred_element_type=jnp.float32)
    # sum_s(d_probs * probs) is sum_h(d_out * out): a reduction over h, not over the [t, s] scores
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_scores = probs * (d_probs - delta)
    d_scores = (jnp.where(mask_bts[:, None, None], d_scores, 0.0) * scale).astype(q.dtype)
    dq = jnp.einsum("bkgts,bksh->bkgth", d_scores, k).transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, h)
    dk = over_queries(q, d_scores).transpose(0, 3, 1, 2)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


attention.defvjp(_attention_fwd, _attention_bwd)
