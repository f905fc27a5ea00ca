"""Shared building blocks for every model family.

Glossary of the dimension letters in tensor names (``x_btd``, ``w_dnh``):
  b batch, t query length, s key length, d model width, f MLP width, n query heads,
  k key/value heads, g query heads per key/value head (n = k * g), h head dim, v vocab, l layers.

Every parameter is created through :func:`param`, which records its logical axis names
(``embed``, ``mlp``, ``heads``, ``kv_heads``, ``head_dim``, ``vocab``, ``layers``, ...). The sharding
module maps those names to mesh axes; no parameter exists without them.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.errors import ModelError
from jaxtune.models.ops import (
    MASKED,
    add_features,
    attention,
    dense,
    gated,
    layer_norm,
    mlp_down,
    rms_norm,
)
from jaxtune.models.ops import activation as _activation

# Logical axis names used on parameters. Kept in one place so sharding rules can be checked against it.
# ``types``: BERT token types; ``labels``: classifier outputs. Both are small and stay replicated.
AXIS_NAMES = (
    "layers",
    "vocab",
    "embed",
    "mlp",
    "heads",
    "kv_heads",
    "head_dim",
    "qkv",
    "position",
    "norm",
    "types",
    "labels",
    "lora_rank",
)


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    """The fields every architecture config starts with (DecoderConfig, EncoderConfig). Configs are
    frozen, hence hashable, so they can live in a module's static structure."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int


ATTENTION_IMPLS = ("reference", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class CallOptions:
    """How a forward pass runs, chosen by the caller (a training step, generation), never stored in the
    architecture: ``remat`` (none | full | dots: what the scanned layers keep for the backward pass)
    and ``attention`` (the attention implementation, see :func:`attend`)."""

    remat: str = "none"
    attention: str = "reference"


DEFAULT_OPTIONS = CallOptions()


ACTIVATION = ("batch", "length", "act_embed")  # logical names of the residual stream [b, t, d]
# A generation's key/value cache [l, b, s, k, h], stacked over layers like the parameters; sharded over
# the batch and the key/value heads as the activations and attention weights are.
CACHE = ("layers", "batch", "length", "kv_heads", "head_dim")


def param(rngs: nnx.Rngs, init, shape, names, dtype) -> nnx.Param:
    """A parameter with logical axis names; sharding is applied later, from the abstract state."""
    assert len(shape) == len(names), (shape, names)
    for name in names:
        assert name in AXIS_NAMES, name
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=tuple(names), eager_sharding=False)


def stack(num_layers: int, make_block, rngs: nnx.Rngs):
    """``num_layers`` blocks with their parameters stacked on a leading ``layers`` axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, axis_size=num_layers, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(rngs):
        return make_block(rngs)

    return build(rngs)


REMAT_POLICIES = {
    "full": None,  # save nothing inside a layer; recompute it all on the way back
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def scan(stacked, x, per_layer, step, remat: str = "none", outputs: bool = False):
    """Run stacked blocks in order with ``jax.lax.scan``: ``x = step(block, x, per_layer[i])``.

    One traced body for all layers keeps compile time flat in depth. ``remat`` wraps the body in
    ``jax.checkpoint`` so the backward pass keeps only each layer's input (``full``) or also its matmul
    outputs (``dots``). With ``outputs``, ``step`` returns ``(x, y)`` and scan returns ``(x, ys)``, the
    ``y`` of every layer stacked on a leading axis (a stacked key/value cache, say).
    """
    graphdef, state = nnx.split(stacked)

    def body(x, inputs):
        layer_state, xs = inputs
        out = step(nnx.merge(graphdef, layer_state), x, xs)
        return out if outputs else (out, None)

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)

    x, ys = jax.lax.scan(body, x, (state, per_layer))
    return (x, ys) if outputs else x


class Dropout:
    """Inverted dropout for a training step, handed down the forward call (``None`` everywhere else:
    eval, predict, generation).

    The masks come from a key the train step derives from the seed and the step number, so a resumed
    run draws exactly the masks an uninterrupted one would, and no random state is checkpointed. Each
    layer and each site within it folds its own number into the key.
    """

    # Sites, where BERT and GPT-2 apply theirs: the embeddings, the attention probabilities, the
    # attention and MLP outputs before their residual sums, and the classifier's input; then LoRA
    # adapters' inputs, each at its own rate, one site per adapter.
    EMBED, ATTN_PROBS, ATTN_OUT, MLP_OUT, HEAD, LAYERS, LORA = range(7)

    def __init__(self, rate: float, key):
        self.rate, self.key = rate, key

    def layer(self, index) -> Dropout:
        return Dropout(self.rate, jax.random.fold_in(jax.random.fold_in(self.key, self.LAYERS), index))

    def __call__(self, x, site: int, rate: float | None = None):
        rate = self.rate if rate is None else rate
        keep = jax.random.bernoulli(jax.random.fold_in(self.key, site), 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)

    def adapter(self, x, site: int, rate: float):
        """Dropout on the input of LoRA adapter number ``site``."""
        return self(x, self.LORA + 1 + site, rate) if rate else x


def drop(dropout: Dropout | None, x, site: int):
    return x if dropout is None or not dropout.rate else dropout(x, site)


def for_layer(dropout: Dropout | None, index):
    return None if dropout is None else dropout.layer(index)


normal = nnx.initializers.normal
zeros = nnx.initializers.zeros
ones = nnx.initializers.ones


class Norm(nnx.Module):
    """RMSNorm (``rms``), Gemma's RMSNorm with a ``1 + w`` scale (``rms_one``), or LayerNorm (``layer``).

    Statistics are computed in float32 whatever the compute dtype, as transformers does.
    """

    def __init__(self, dim: int, kind: str, eps: float, *, rngs, dtype, names=("norm",)):
        self.kind, self.eps = kind, eps
        self.weight = param(rngs, zeros if kind == "rms_one" else ones, (dim,), names, dtype)
        if kind == "layer":
            self.bias = param(rngs, zeros, (dim,), names, dtype)

    def __call__(self, x):
        w = self.weight[...]
        if self.kind == "layer":
            return layer_norm(x, w, self.bias[...], self.eps)
        if self.kind == "rms":  # Llama casts the normalised activations back, then scales
            return rms_norm(x, w, self.eps)
        # Gemma scales in float32, then casts.
        y = x.astype(jnp.float32)
        y = y * jax.lax.rsqrt(jnp.square(y).mean(-1, keepdims=True) + self.eps)
        return (y * (1.0 + w.astype(jnp.float32))).astype(x.dtype)


# transformers' activation names (the keys of its ACT2FN) that jaxtune runs, and what each computes:
# swish is SiLU, gelu_python erf's GELU written in Python, and the other gelu_* names the tanh
# approximation written in different ways.
_HF_ACTIVATIONS = {
    **{n: "silu" for n in ("silu", "swish")},
    **{n: "gelu" for n in ("gelu", "gelu_python")},
    **{n: "gelu_tanh" for n in ("gelu_pytorch_tanh", "gelu_python_tanh", "gelu_new", "gelu_fast")},
    "relu": "relu",
}


def activation_name(name: str) -> str:
    """The activation of a Hugging Face ``hidden_act`` name: ``silu``, ``gelu`` (erf's), ``gelu_tanh`` or
    ``relu``."""
    if name not in _HF_ACTIVATIONS:
        raise ModelError(
            f"config.json's activation {name!r} (hidden_act, hidden_activation, activation or "
            f"activation_function) is not supported; jaxtune runs {', '.join(_HF_ACTIVATIONS)}"
        )
    return _HF_ACTIVATIONS[name]


def rope_inv_freq(head_dim: int, rope: dict) -> tuple[np.ndarray, float]:
    """Inverse frequencies and attention factor for a Hugging Face ``rope_parameters`` dict.

    Supported ``rope_type``: default, linear, llama3. Computed in float32 with the same operation order
    as transformers so positions far along the sequence still agree to float32 precision.
    """
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope["rope_theta"])
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return (inv_freq / np.float32(rope["factor"])).astype(np.float32), 1.0
    if kind == "llama3":
        factor = rope["factor"]
        low, high = rope["low_freq_factor"], rope["high_freq_factor"]
        old_len = rope["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    raise ValueError(f"rope_type {kind!r} is not supported; supported: default, linear, llama3")


def apply_rope(x_btnh, positions_bt, inv_freq_h2, factor: float):
    """Rotary embedding in the rotate-half layout used by Hugging Face checkpoints."""
    freqs = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_h2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = (jnp.cos(emb) * factor).astype(x_btnh.dtype), (jnp.sin(emb) * factor).astype(x_btnh.dtype)
    x1, x2 = jnp.split(x_btnh, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x_btnh * cos + rotated * sin


def attention_mask_bts(attention_mask_bs, segment_ids_bt, length: int, window=0, causal: bool = True):
    """Boolean mask [b, t, s]: causal (decoders), not padding, same segment, inside the sliding window.

    ``window`` is a traced scalar (0 = global) so layers with different windows share one scanned body.
    """
    idx = jnp.arange(length)
    q, k = idx[:, None], idx[None, :]
    mask = (k <= q)[None] if causal else jnp.ones((1, length, length), bool)
    if causal:
        mask = mask & jnp.where(window > 0, k > q - window, True)[None]
    if attention_mask_bs is not None:
        mask = mask & (attention_mask_bs[:, None, :] > 0)
    if segment_ids_bt is not None:
        mask = mask & (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])
    return mask


def cache_mask_bts(key_mask_bs, slot, length: int, window=0):
    """Boolean mask [b, t, s] of ``length`` new tokens at cache slots ``slot ...`` against every slot:
    the key's slot is not after the query's, holds a token (``key_mask_bs``; left padding does not),
    and is inside the sliding window. Slots of one row's real tokens are consecutive, so slot
    distances are token distances, as in :func:`attention_mask_bts`."""
    q = slot + jnp.arange(length)[:, None]
    k = jnp.arange(key_mask_bs.shape[1])[None, :]
    mask = (k <= q) & jnp.where(window > 0, k > q - window, True)
    return mask[None] & (key_mask_bs[:, None, :] > 0)


CAUSAL_CHUNK = 256  # query rows per block of causal self-attention from 2 blocks on (see attend)


def attend(
    q_btnh,
    k_bskh,
    v_bskh,
    mask_bts,
    *,
    scale: float,
    softcap: float = 0.0,
    dropout=None,
    impl="reference",
    causal: bool = False,
):
    """``softmax(q k^T * scale, masked) v`` with grouped key/value heads (n query heads over k key/value
    heads); the query length t may differ from the key length s (a decode step against a cache).

    ``impl``: ``reference`` (einsums, scores in float32), ``xla`` (``jax.nn.dot_product_attention``,
    which XLA may fuse) or ``cudnn`` (the same call with cuDNN's fused kernel: NVIDIA GPUs, bfloat16 or
    float16 only). Gemma 2's soft-capping and dropout on the probabilities exist in the reference
    only, so a call that needs them takes it whatever ``impl`` says.

    ``causal``: the mask is causal self-attention (t = s, no key after its query), so the reference
    skips the blocks above the diagonal: queries go in blocks of ``CAUSAL_CHUNK`` rows, each against
    the keys up to its last row only. At 1024 tokens that is 10/16 of the full product's work and
    memory; the result is the same, since the skipped keys are masked anyway, except in a query row
    that sees no key at all (left padding), which no real token reads.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {impl!r} is not one of {', '.join(ATTENTION_IMPLS)}")
    plain = not softcap and (dropout is None or not dropout.rate)  # what every implementation computes
    if plain and impl == "cudnn" and causal:
        return _cudnn_causal(q_btnh, k_bskh, v_bskh, mask_bts, scale)
    if plain and impl != "reference":
        return jax.nn.dot_product_attention(
            q_btnh, k_bskh, v_bskh, mask=mask_bts[:, None], scale=scale, implementation=impl
        )
    if plain:
        t = q_btnh.shape[1]
        if not causal or t < 2 * CAUSAL_CHUNK or t % CAUSAL_CHUNK:
            return attention(q_btnh, k_bskh, v_bskh, mask_bts, scale)
        blocks = []
        for end in range(CAUSAL_CHUNK, t + 1, CAUSAL_CHUNK):
            rows = slice(end - CAUSAL_CHUNK, end)
            q, k, v, mask = q_btnh[:, rows], k_bskh[:, :end], v_bskh[:, :end], mask_bts[:, rows, :end]
            blocks.append(attention(q, k, v, mask, scale))
        return jnp.concatenate(blocks, axis=1)
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, k, n // k, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh, preferred_element_type=jnp.float32)
    scores = scores * scale
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask_bts[:, None, None], scores, MASKED)
    probs = drop(dropout, jax.nn.softmax(scores, axis=-1).astype(v_bskh.dtype), Dropout.ATTN_PROBS)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh).reshape(b, t, n, h)


def causal_right_padding(mask_bts):
    """``(lengths [b], right_padded)``: whether the causal self-attention mask ``mask_bts`` is exactly
    "key k is seen by query q when k <= q and k < the row's length" (right padding, no segments or
    window), and the lengths (the keys its last query sees) that then describe it."""
    t = mask_bts.shape[1]
    idx = jnp.arange(t)
    lengths_b = jnp.sum(mask_bts[:, -1, :], axis=-1, dtype=jnp.int32)
    expected = (idx[None, :] <= idx[:, None])[None] & (idx[None, None, :] < lengths_b[:, None, None])
    return lengths_b, jnp.all(mask_bts == expected)


def _cudnn_causal(q_btnh, k_bskh, v_bskh, mask_bts, scale):
    """cuDNN's fused causal self-attention, with the mask in the form cuDNN builds inside the kernel
    when it has one: causal with right padding (every key of a row up to its length; queries past it
    see the same keys, as in the dense mask). That kernel skips the blocks above the diagonal and
    reads no [t, s] array. Any other mask (packed segments, sliding windows, left padding) goes to
    cuDNN as a dense bias, with the causal mask type so the skipped blocks stay skipped; the bias
    path also makes cuDNN write a bias gradient that nothing reads, which is why it is the fallback.
    Which mask a batch has is only known at run time, so both are compiled and a ``cond`` picks."""
    t = mask_bts.shape[1]
    lengths_b, right_padded = causal_right_padding(mask_bts)

    def kernel_mask(q, k, v, lengths):
        # A row of padding alone (length 0) takes key 0 rather than none: nothing reads that row, and
        # a kernel row with no key at all need not be finite.
        lengths = jnp.maximum(lengths, 1)
        full = jnp.full_like(lengths, t)
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            scale=scale,
            is_causal=True,
            query_seq_lengths=full,
            key_value_seq_lengths=lengths,
            implementation="cudnn",
        )

    def dense_mask(q, k, v, lengths):
        del lengths
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask_bts[:, None], scale=scale, is_causal=True, implementation="cudnn"
        )

    return jax.lax.cond(right_padded, kernel_mask, dense_mask, q_btnh, k_bskh, v_bskh, lengths_b)


class Attention(nnx.Module):
    """Multi-head attention with grouped/multi-query key-value heads, rotary or no positions,
    optional q/k norm (Qwen3), logit soft-capping (Gemma 2) and a fused qkv projection (GPT-2)."""

    def __init__(self, cfg, *, rngs, dtype):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg = cfg
        init = normal(cfg.init_std)
        if cfg.fused_qkv:
            assert n == k, "a fused qkv projection needs as many key/value heads as query heads"
            self.qkv_proj = Linear(
                d,
                (3, n, h),
                ("embed",),
                ("qkv", "heads", "head_dim"),
                cfg.qkv_bias,
                init,
                rngs=rngs,
                dtype=dtype,
            )
        else:
            self.q_proj = Linear(
                d, (n, h), ("embed",), ("heads", "head_dim"), cfg.qkv_bias, init, rngs=rngs, dtype=dtype
            )
            self.k_proj = Linear(
                d, (k, h), ("embed",), ("kv_heads", "head_dim"), cfg.qkv_bias, init, rngs=rngs, dtype=dtype
            )
            self.v_proj = Linear(
                d, (k, h), ("embed",), ("kv_heads", "head_dim"), cfg.qkv_bias, init, rngs=rngs, dtype=dtype
            )
        self.o_proj = Linear(
            (n, h), d, ("heads", "head_dim"), ("embed",), cfg.o_bias, init, rngs=rngs, dtype=dtype
        )
        if cfg.qk_norm:
            self.q_norm = Norm(h, cfg.norm, cfg.norm_eps, rngs=rngs, dtype=dtype, names=("head_dim",))
            self.k_norm = Norm(h, cfg.norm, cfg.norm_eps, rngs=rngs, dtype=dtype, names=("head_dim",))

    def __call__(
        self,
        x_btd,
        positions_bt,
        mask_bts,
        dropout: Dropout | None = None,
        options=DEFAULT_OPTIONS,
        cache=None,
    ):
        """Attention of ``x_btd`` over itself; or, with ``cache = (k_bskh, v_bskh, slot)`` (one layer's
        cached keys and values and where the new tokens go), over the cache with the new tokens written
        in: then ``(out, (k_btkh, v_btkh))``, the new tokens' keys and values for the caller to store."""
        cfg = self.cfg
        if cfg.fused_qkv:
            qkv = self.qkv_proj(x_btd, dropout)
            q_btnh, k_btkh, v_btkh = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            q_btnh = self.q_proj(x_btd, dropout)
            k_btkh, v_btkh = self.k_proj(x_btd, dropout), self.v_proj(x_btd, dropout)
        if cfg.qk_norm:
            q_btnh, k_btkh = self.q_norm(q_btnh), self.k_norm(k_btkh)
        if cfg.position == "rope":
            inv_freq, factor = rope_inv_freq(cfg.head_dim, dict(cfg.rope))
            q_btnh = apply_rope(q_btnh, positions_bt, inv_freq, factor)
            k_btkh = apply_rope(k_btkh, positions_bt, inv_freq, factor)
        keys, values = k_btkh, v_btkh
        if cache is not None:
            k_bskh, v_bskh, slot = cache
            keys = jax.lax.dynamic_update_slice_in_dim(k_bskh, k_btkh.astype(k_bskh.dtype), slot, axis=1)
            values = jax.lax.dynamic_update_slice_in_dim(v_bskh, v_btkh.astype(v_bskh.dtype), slot, axis=1)
        out_btnh = attend(
            q_btnh,
            keys.astype(q_btnh.dtype),
            values.astype(q_btnh.dtype),
            mask_bts,
            scale=cfg.attn_scale,
            softcap=cfg.attn_softcap,
            dropout=dropout,
            impl=options.attention,
            causal=cfg.causal and cache is None,
        )
        out = self.o_proj(out_btnh, dropout)
        return out if cache is None else (out, (k_btkh, v_btkh))


class Linear(nnx.Module):
    """A dense layer whose input and output sides may each span several named dimensions; with a LoRA
    adapter (``lora_a``, ``lora_b``: see :mod:`jaxtune.models.lora`) it adds ``scale * (x A) B``."""

    def __init__(self, in_shape, out_shape, in_names, out_names, bias: bool, init, *, rngs, dtype):
        in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
        out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
        self.n_in = len(in_shape)
        self.kernel = param(rngs, init, in_shape + out_shape, tuple(in_names) + tuple(out_names), dtype)
        if bias:
            self.bias = param(rngs, zeros, out_shape, out_names, dtype)

    def __call__(self, x, dropout: Dropout | None = None):
        y = self.biased(dense(x, self.kernel[...], self.n_in))
        if hasattr(self, "lora_a"):
            if dropout is not None:
                x = dropout.adapter(x, self.lora_site, self.lora_dropout)
            h = dense(x, self.lora_a[...].astype(x.dtype), self.n_in)
            y = y + self.lora_scale * dense(h, self.lora_b[...].astype(x.dtype), 1)
        return y

    def biased(self, y):
        """The product ``y`` of this layer's kernel, plus its bias if it has one."""
        return add_features(y, self.bias[...]) if hasattr(self, "bias") else y


class MLP(nnx.Module):
    """Gated (SwiGLU / GeGLU: ``down(act(gate(x)) * up(x))``) or plain (``down(act(up(x)))``) MLP."""

    def __init__(self, cfg, *, rngs, dtype):
        d, f, init = cfg.hidden_size, cfg.intermediate_size, normal(cfg.init_std)
        self.act_name = activation_name(cfg.activation)
        self.gated = cfg.gated_mlp
        if cfg.gated_mlp:
            self.gate_proj = Linear(d, f, ("embed",), ("mlp",), cfg.mlp_bias, init, rngs=rngs, dtype=dtype)
        self.up_proj = Linear(d, f, ("embed",), ("mlp",), cfg.mlp_bias, init, rngs=rngs, dtype=dtype)
        self.down_proj = Linear(f, d, ("mlp",), ("embed",), cfg.mlp_bias, init, rngs=rngs, dtype=dtype)

    def __call__(self, x_btd, dropout: Dropout | None = None):
        gate = self.gate_proj(x_btd, dropout) if self.gated else None
        up, down = self.up_proj(x_btd, dropout), self.down_proj
        if hasattr(down, "lora_a"):  # the adapter reads the hidden state too
            h = _activation(up, self.act_name) if gate is None else gated(gate, up, self.act_name)
            return down(h, dropout)
        return down.biased(mlp_down(up, gate, down.kernel[...], self.act_name))


def default_positions(attention_mask_bt, segment_ids_bt, b: int, t: int):
    """Position ids when none are given: count only real tokens (so left padding does not shift
    positions) and restart at each new segment of a packed row."""
    idx = jnp.broadcast_to(jnp.arange(t), (b, t))
    if segment_ids_bt is not None:
        starts = jnp.where(jnp.pad(segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1], ((0, 0), (1, 0))), idx, 0)
        return idx - jax.lax.cummax(starts, axis=1)
    if attention_mask_bt is not None:
        return jnp.maximum(jnp.cumsum(attention_mask_bt.astype(jnp.int32), axis=1) - 1, 0)
    return idx
