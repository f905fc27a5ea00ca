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

from jaxtune.errors import ModelError
from jaxtune.logical import constrain
from jaxtune.models import heads, layers
from jaxtune.models import lora as adapters


@dataclasses.dataclass(frozen=True)
class DecoderConfig(layers.ArchConfig):
    """Architecture of a decoder."""

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
    pad_token_id: int = -1  # -1: none; sequence classification then uses the attention mask
    hf_config_json: str = dataclasses.field(default="{}", compare=False)

    @property
    def causal(self) -> bool:  # a token sees the tokens before it and itself
        return True

    def __post_init__(self):
        if not self.attn_scale:
            object.__setattr__(self, "attn_scale", self.head_dim**-0.5)
        if not self.windows:
            object.__setattr__(self, "windows", (0,) * self.num_layers)
        assert len(self.windows) == self.num_layers
        if self.num_heads % self.num_kv_heads:
            raise ModelError(
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

    def __call__(
        self, x_btd, positions_bt, mask_bts, dropout=None, options=layers.DEFAULT_OPTIONS, cache=None
    ):
        """The layer's output; with a ``cache`` (see :class:`layers.Attention`), also the new tokens'
        keys and values."""
        h = self.attn(self.attn_norm(x_btd), positions_bt, mask_bts, dropout, options, cache)
        if cache is not None:
            h, new_kv = h
        if self.sandwich:
            h = self.post_attn_norm(h)
        x_btd = x_btd + layers.drop(dropout, h, layers.Dropout.ATTN_OUT)
        h = self.mlp(self.mlp_norm(x_btd), dropout)
        if self.sandwich:
            h = self.post_mlp_norm(h)
        x_btd = x_btd + layers.drop(dropout, h, layers.Dropout.MLP_OUT)
        return x_btd if cache is None else (x_btd, new_kv)


class Decoder(nnx.Module):
    """Decoder-only transformer with a task head.

    ``model(input_ids, attention_mask=None) ->`` next-token logits ``[b, t, vocab]`` (``causal_lm``),
    label logits ``[b, labels]`` classified from the last non-padding token
    (``sequence_classification``), ``[b, t, labels]`` (``token_classification``), or the final-norm
    hidden states ``[b, t, d]`` (``base``).
    """

    def __init__(
        self,
        cfg: DecoderConfig,
        task: heads.Task = heads.CAUSAL_LM,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        lora=None,
    ):
        self.cfg, self.task = cfg, task
        init = layers.normal(cfg.init_std)
        self.embed = layers.param(rngs, init, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype)
        if cfg.position == "learned":
            self.pos_embed = layers.param(
                rngs, init, (cfg.max_positions, cfg.hidden_size), ("position", "embed"), dtype
            )
        self.layers = layers.stack(cfg.num_layers, lambda r: Block(cfg, rngs=r, dtype=dtype), rngs)
        self.final_norm = layers.Norm(
            cfg.hidden_size, cfg.norm, cfg.norm_eps, rngs=rngs, dtype=dtype, names=("embed",)
        )
        if task.name == "causal_lm" and not cfg.tie_embeddings:
            self.lm_head = layers.param(
                rngs, init, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype
            )
        for name, module in self.make_head(cfg, task, rngs=rngs, dtype=dtype).items():
            setattr(self, name, module)
        self.lora = lora  # a lora.LoraSpec: adapters beside the dense layers it targets
        if lora is not None:
            adapters.add(self, lora)

    @staticmethod
    def make_head(cfg: DecoderConfig, task: heads.Task, *, rngs, dtype) -> dict:
        """Classification heads: transformers' ``score`` layer, with a bias only for token classification."""
        if task.name not in heads.CLASSIFICATION:
            return {}
        bias = task.name == "token_classification"
        return {
            "score": heads.dense(
                cfg.hidden_size, task.num_labels, "labels", bias, cfg.init_std, rngs=rngs, dtype=dtype
            )
        }

    def hidden_states(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        segment_ids=None,
        dropout: layers.Dropout | None = None,
        options: layers.CallOptions = layers.DEFAULT_OPTIONS,
    ):
        """Final-norm hidden states ``[b, t, d]``; ``dropout`` only in a training step; ``options``: remat
        and the attention implementation."""
        cfg = self.cfg
        input_ids = jnp.asarray(input_ids)
        b, t = input_ids.shape
        attention_mask = None if attention_mask is None else jnp.asarray(attention_mask)
        segment_ids = None if segment_ids is None else jnp.asarray(segment_ids)
        if position_ids is None:
            position_ids = layers.default_positions(attention_mask, segment_ids, b, t)
        position_ids = jnp.asarray(position_ids)
        x_btd = self._embed(input_ids, position_ids, dropout)

        def step(block, x_btd, per_layer):
            window, index = per_layer
            mask_bts = layers.attention_mask_bts(attention_mask, segment_ids, t, window)
            return constrain(
                block(x_btd, position_ids, mask_bts, layers.for_layer(dropout, index), options),
                layers.ACTIVATION,
            )

        per_layer = (jnp.asarray(cfg.windows, jnp.int32), jnp.arange(cfg.num_layers))
        x_btd = layers.scan(self.layers, x_btd, per_layer, step, options.remat)
        return self.final_norm(x_btd)

    def _embed(self, input_ids, position_ids, dropout=None):
        cfg = self.cfg
        x_btd = self.embed[...][input_ids]
        if cfg.embed_scale:
            x_btd = x_btd * jnp.asarray(cfg.hidden_size**0.5, dtype=x_btd.dtype)
        if cfg.position == "learned":
            x_btd = x_btd + self.pos_embed[...][position_ids]
        return constrain(layers.drop(dropout, x_btd, layers.Dropout.EMBED), layers.ACTIVATION)

    def empty_cache(self, batch: int, length: int, dtype) -> dict:
        """A key/value cache of ``length`` slots for ``batch`` rows: ``k`` and ``v`` [l, b, s, k, h]."""
        cfg = self.cfg
        shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
        return {name: constrain(jnp.zeros(shape, dtype), layers.CACHE) for name in ("k", "v")}

    def extend(
        self,
        input_ids,
        position_ids,
        cache: dict,
        key_mask,
        slot,
        options=layers.DEFAULT_OPTIONS,
        blocks=None,
    ):
        """``t`` new tokens (``input_ids`` [b, t] at ``position_ids``) against a key/value cache, written
        at slots ``slot ... slot + t - 1``: (final-norm hidden states [b, t, d], the cache with their
        keys and values). ``key_mask`` [b, s]: the slots that hold tokens, the new ones included. A
        prefill is one call over the prompt at slot 0, a decode step one call per token.

        Each layer reads its slice of the cache; only the new keys and values leave the layers and go
        into the cache in one update, so a donated cache is updated in place. ``blocks``: the layers as
        separate modules (one array per weight and layer), run one after the other instead of
        scanned; on CPU a scanned layer copies its slice of every stacked weight first, which doubles
        the memory traffic of a decode step."""
        cfg = self.cfg
        input_ids, position_ids = jnp.asarray(input_ids), jnp.asarray(position_ids)
        t = input_ids.shape[1]
        x_btd = self._embed(input_ids, position_ids)

        def step(block, x_btd, per_layer):
            window, k_bskh, v_bskh = per_layer
            mask_bts = layers.cache_mask_bts(key_mask, slot, t, window)
            x_btd, new_kv = block(x_btd, position_ids, mask_bts, None, options, (k_bskh, v_bskh, slot))
            return constrain(x_btd, layers.ACTIVATION), new_kv

        if blocks is None:
            per_layer = (jnp.asarray(cfg.windows, jnp.int32), cache["k"], cache["v"])
            x_btd, (k_lbtkh, v_lbtkh) = layers.scan(self.layers, x_btd, per_layer, step, outputs=True)
        else:
            new = []
            for i, block in enumerate(blocks):
                x_btd, kv = step(block, x_btd, (cfg.windows[i], cache["k"][i], cache["v"][i]))
                new.append(kv)
            k_lbtkh, v_lbtkh = (jnp.stack([kv[j] for kv in new]) for j in (0, 1))
        cache = {
            name: constrain(
                jax.lax.dynamic_update_slice_in_dim(cache[name], new.astype(cache[name].dtype), slot, axis=2),
                layers.CACHE,
            )
            for name, new in (("k", k_lbtkh), ("v", v_lbtkh))
        }
        return self.final_norm(x_btd), cache

    def logits(self, x_btd):
        """Vocabulary logits for hidden states (tied or separate head, Gemma 2 soft-capping)."""
        return self.logits_with(self.output_weights()[0], x_btd)

    def output_weights(self):
        """The output layer's weight and its logical axis names: ``[vocab, embed]`` when tied to the
        embedding, else ``[embed, vocab]``; what :meth:`logits_with` multiplies by (the loss
        differentiates it explicitly)."""
        if self.cfg.tie_embeddings:
            return self.embed[...], ("vocab", "embed")
        return self.lm_head[...], ("embed", "vocab")

    def logits_with(self, w, x_btd):
        """:meth:`logits` through the output weight ``w``; reads nothing else of the model's state."""
        # Accumulated and returned in float32 at least (float64 stays float64): the softmax over a
        # large vocabulary needs it.
        f32 = jnp.promote_types(jnp.float32, x_btd.dtype)
        # The tied [vocab, embed] weight goes in transposed: its product then has dense's backward pass.
        w_dv = w.T if self.cfg.tie_embeddings else w
        logits = layers.dense(x_btd, w_dv.astype(x_btd.dtype), 1, f32)
        if self.cfg.final_softcap:
            logits = jnp.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return logits

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        segment_ids=None,
        dropout: layers.Dropout | None = None,
        options: layers.CallOptions = layers.DEFAULT_OPTIONS,
    ):
        if token_type_ids is not None:
            raise ModelError(f"{self.cfg.model_type} has no token types; pass token_type_ids=None")
        # transformers' decoder classifiers (Llama, GPT-2, ...) have no dropout before their score layer.
        x_btd = self.hidden_states(input_ids, attention_mask, position_ids, segment_ids, dropout, options)
        task = self.task.name
        if task == "causal_lm":
            return self.logits(x_btd)
        if task == "sequence_classification":
            last_b = heads.last_token_index(jnp.asarray(input_ids), attention_mask, self.cfg.pad_token_id)
            x_btd = x_btd[jnp.arange(x_btd.shape[0]), last_b]
        if task == "base":
            return x_btd
        return self.score(x_btd)
