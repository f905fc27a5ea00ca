"""The decoder-only causal language model shared by every decoder family.

Families (llama.py, gemma.py, gpt2.py) differ only in how a Hugging Face config maps onto
:class:`DecoderConfig` and in their weight-name table; the module below is the same for all of them.
Layers are stacked on a leading ``layers`` axis and run with ``jax.lax.scan`` so compile time does not
grow with depth.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.models import layers


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture of a decoder. Hashable, so it can live in a module's static structure."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm: str = "rms"  # rms | rms_one (Gemma) | layer (GPT-2)
    norm_eps: float = 1e-6
    activation: str = "silu"
    gated_mlp: bool = True
    position: str = "rope"  # rope | learned (GPT-2)
    max_positions: int = 2048
    rope: tuple = ()  # items of a Hugging Face rope_parameters dict
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    fused_qkv: bool = False
    qk_norm: bool = False
    sandwich_norm: bool = False  # Gemma 2: norms after attention and MLP as well as before
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    attn_scale: float = 0.0  # 0 means head_dim ** -0.5
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    windows: tuple = ()  # per layer sliding window; 0 = global attention
    tie_embeddings: bool = False
    init_std: float = 0.02
    hf_config_json: str = dataclasses.field(default="{}", compare=False)

    def __post_init__(self):
        if not self.attn_scale:
            object.__setattr__(self, "attn_scale", self.head_dim**-0.5)
        if not self.windows:
            object.__setattr__(self, "windows", (0,) * self.num_layers)
        assert len(self.windows) == self.num_layers
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )


class Block(nnx.Module):
    """One pre-norm transformer layer (with Gemma 2's extra post-norms when configured)."""

    def __init__(self, cfg: DecoderConfig, *, rngs, dtype):
        d = cfg.hidden_size
        self.sandwich = cfg.sandwich_norm
        self.attn_norm = layers.Norm(d, cfg.norm, cfg.norm_eps, rngs=rngs, dtype=dtype, names=("embed",))
        self.attn = layers.Attention(cfg, rngs=rngs, dtype=dtype)
        self.mlp_norm = layers.Norm(d, cfg.norm, cfg.norm_eps, rngs=rngs, dtype=dtype, names=("embed",))
        self.mlp = layers.MLP(cfg, rngs=rngs, dtype=dtype)
        if cfg.sandwich_norm:
            self.post_attn_norm = layers.Norm(
                d, cfg.norm, cfg.norm_eps, rngs=rngs, dtype=dtype, names=("embed",)
            )
            self.post_mlp_norm = layers.Norm(
                d, cfg.norm, cfg.norm_eps, rngs=rngs, dtype=dtype, names=("embed",)
            )

    def __call__(self, x_btd, positions_bt, mask_bts):
        h = self.attn(self.attn_norm(x_btd), positions_bt, mask_bts)
        if self.sandwich:
            h = self.post_attn_norm(h)
        x_btd = x_btd + h
        h = self.mlp(self.mlp_norm(x_btd))
        if self.sandwich:
            h = self.post_mlp_norm(h)
        return x_btd + h


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


class CausalLM(nnx.Module):
    """Decoder-only language model: ``model(input_ids, attention_mask=None) -> logits [b, t, vocab]``."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg = cfg
        init = layers.normal(cfg.init_std)
        self.embed = layers.param(rngs, init, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype)
        if cfg.position == "learned":
            self.pos_embed = layers.param(
                rngs, init, (cfg.max_positions, cfg.hidden_size), ("position", "embed"), dtype
            )

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(
            in_axes=0, out_axes=0, axis_size=cfg.num_layers, transform_metadata={nnx.PARTITION_NAME: "layers"}
        )
        def stacked(rngs):
            return Block(cfg, rngs=rngs, dtype=dtype)

        self.layers = stacked(rngs)
        self.final_norm = layers.Norm(
            cfg.hidden_size, cfg.norm, cfg.norm_eps, rngs=rngs, dtype=dtype, names=("embed",)
        )
        if not cfg.tie_embeddings:
            self.lm_head = layers.param(
                rngs, init, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype
            )

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None):
        """Final-norm hidden states ``[b, t, d]``."""
        cfg = self.cfg
        input_ids = jnp.asarray(input_ids)
        b, t = input_ids.shape
        attention_mask = None if attention_mask is None else jnp.asarray(attention_mask)
        segment_ids = None if segment_ids is None else jnp.asarray(segment_ids)
        if position_ids is None:
            position_ids = default_positions(attention_mask, segment_ids, b, t)
        position_ids = jnp.asarray(position_ids)
        embed = self.embed[...]
        x_btd = embed[input_ids]
        if cfg.embed_scale:
            x_btd = x_btd * jnp.asarray(cfg.hidden_size**0.5, dtype=x_btd.dtype)
        if cfg.position == "learned":
            x_btd = x_btd + self.pos_embed[...][position_ids]

        graphdef, stacked_state = nnx.split(self.layers)

        def body(x_btd, xs):
            layer_state, window = xs
            mask_bts = layers.attention_mask_bts(attention_mask, segment_ids, t, window)
            return nnx.merge(graphdef, layer_state)(x_btd, position_ids, mask_bts), None

        x_btd, _ = jax.lax.scan(body, x_btd, (stacked_state, jnp.asarray(cfg.windows, jnp.int32)))
        return self.final_norm(x_btd)

    def logits(self, x_btd):
        """Vocabulary logits for hidden states (tied or separate head, Gemma 2 soft-capping)."""
        if self.cfg.tie_embeddings:
            logits = jnp.einsum("btd,vd->btv", x_btd, self.embed[...].astype(x_btd.dtype))
        else:
            logits = jnp.einsum("btd,dv->btv", x_btd, self.lm_head[...].astype(x_btd.dtype))
        if self.cfg.final_softcap:
            logits = jnp.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return logits

    def __call__(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None):
        return self.logits(self.hidden_states(input_ids, attention_mask, position_ids, segment_ids))
