"""The bidirectional encoder shared by BERT, RoBERTa and DistilBERT.

They differ from the decoders in three ways: attention sees the whole sequence, each layer normalises
after the residual sum (post-norm) rather than before, and the input embeddings add learned positions
(and, for BERT and RoBERTa, token types) before a LayerNorm. Attention and MLP are the shared layers.
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
class EncoderConfig(layers.ArchConfig):
    """Architecture of an encoder. The fields after ``hf_config_json`` are fixed for these families and
    exist because the shared Attention and MLP read them."""

    activation: str = "gelu"
    norm_eps: float = 1e-12
    max_positions: int = 512
    type_vocab_size: int = 2  # 0: no token types (DistilBERT)
    # RoBERTa counts positions from pad_token_id + 1 and gives padding tokens position pad_token_id.
    roberta_positions: bool = False
    pad_token_id: int = 0
    base_pooler: bool = True  # whether the bare model (BertModel, RobertaModel) carries a pooler
    pooler_activation: str = "tanh"  # DistilBERT's pre_classifier uses relu
    init_std: float = 0.02
    hf_config_json: str = dataclasses.field(default="{}", compare=False)
    norm: str = "layer"
    position: str = "learned"
    gated_mlp: bool = False
    qkv_bias: bool = True
    o_bias: bool = True
    mlp_bias: bool = True
    fused_qkv: bool = False
    qk_norm: bool = False
    attn_softcap: float = 0.0

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ModelError(
                f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}"
            )

    @property
    def causal(self) -> bool:  # every token sees the whole row
        return False

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def attn_scale(self) -> float:
        return self.head_dim**-0.5


class EncoderBlock(nnx.Module):
    """One post-norm layer: ``x = norm(x + attn(x)); x = norm(x + mlp(x))``."""

    def __init__(self, cfg: EncoderConfig, *, rngs, dtype):
        d = cfg.hidden_size
        self.attn = layers.Attention(cfg, rngs=rngs, dtype=dtype)
        self.attn_norm = layers.Norm(d, "layer", cfg.norm_eps, rngs=rngs, dtype=dtype, names=("embed",))
        self.mlp = layers.MLP(cfg, rngs=rngs, dtype=dtype)
        self.mlp_norm = layers.Norm(d, "layer", cfg.norm_eps, rngs=rngs, dtype=dtype, names=("embed",))

    def __call__(self, x_btd, mask_bts, dropout=None, options=layers.DEFAULT_OPTIONS):
        h = layers.drop(dropout, self.attn(x_btd, None, mask_bts, dropout, options), layers.Dropout.ATTN_OUT)
        x_btd = self.attn_norm(x_btd + h)
        return self.mlp_norm(x_btd + layers.drop(dropout, self.mlp(x_btd, dropout), layers.Dropout.MLP_OUT))


class Encoder(nnx.Module):
    """Bidirectional encoder with a task head.

    ``model(input_ids, attention_mask=None, token_type_ids=None) ->`` label logits ``[b, labels]``
    from the first token (``sequence_classification``), ``[b, t, labels]`` (``token_classification``),
    or the last hidden states ``[b, t, d]`` (``base``).
    """

    def __init__(self, cfg: EncoderConfig, task: heads.Task, *, rngs: nnx.Rngs, dtype=jnp.float32, lora=None):
        if task.name == "causal_lm":
            raise ModelError(
                f"{cfg.model_type} is an encoder and has no causal_lm head in jaxtune; use "
                "task='sequence_classification', 'token_classification' or 'base'"
            )
        self.cfg, self.task = cfg, task
        d, init = cfg.hidden_size, layers.normal(cfg.init_std)
        self.embed = layers.param(rngs, init, (cfg.vocab_size, d), ("vocab", "embed"), dtype)
        self.pos_embed = layers.param(rngs, init, (cfg.max_positions, d), ("position", "embed"), dtype)
        if cfg.type_vocab_size:
            self.type_embed = layers.param(rngs, init, (cfg.type_vocab_size, d), ("types", "embed"), dtype)
        self.embed_norm = layers.Norm(d, "layer", cfg.norm_eps, rngs=rngs, dtype=dtype, names=("embed",))
        self.layers = layers.stack(cfg.num_layers, lambda r: EncoderBlock(cfg, rngs=r, dtype=dtype), rngs)
        for name, module in self.make_head(cfg, task, rngs=rngs, dtype=dtype).items():
            setattr(self, name, module)
        self.lora = lora  # a lora.LoraSpec: adapters beside the dense layers it targets
        if lora is not None:
            adapters.add(self, lora)

    @staticmethod
    def make_head(cfg: EncoderConfig, task: heads.Task, *, rngs, dtype) -> dict:
        """A dense ``pooler`` over the first token (BERT's pooler, RoBERTa's classifier.dense, DistilBERT's
        pre_classifier) and a ``classifier``, as the task needs them."""
        d, std, out = cfg.hidden_size, cfg.init_std, {}
        if task.name == "sequence_classification" or (task.name == "base" and cfg.base_pooler):
            out["pooler"] = heads.dense(d, d, "mlp", True, std, rngs=rngs, dtype=dtype)
        if task.name in heads.CLASSIFICATION:
            out["classifier"] = heads.dense(d, task.num_labels, "labels", True, std, rngs=rngs, dtype=dtype)
        return out

    def positions(self, input_ids_bt, segment_ids_bt):
        """Position ids as transformers computes them: 0..t-1 for BERT and DistilBERT; RoBERTa's count
        of non-padding tokens offset by pad_token_id. Packed rows restart at each segment."""
        cfg = self.cfg
        b, t = input_ids_bt.shape
        if segment_ids_bt is not None:
            pos = layers.default_positions(None, segment_ids_bt, b, t)
            return pos + cfg.pad_token_id + 1 if cfg.roberta_positions else pos
        if cfg.roberta_positions:
            real = (input_ids_bt != cfg.pad_token_id).astype(jnp.int32)
            return jnp.cumsum(real, axis=1) * real + cfg.pad_token_id
        return jnp.broadcast_to(jnp.arange(t), (b, t))

    def hidden_states(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        segment_ids=None,
        dropout: layers.Dropout | None = None,
        options: layers.CallOptions = layers.DEFAULT_OPTIONS,
    ):
        """Last-layer hidden states ``[b, t, d]``; ``dropout`` only in a training step; ``options``: remat
        and the attention implementation."""
        cfg = self.cfg
        input_ids = jnp.asarray(input_ids)
        t = input_ids.shape[1]
        segment_ids = None if segment_ids is None else jnp.asarray(segment_ids)
        attention_mask = None if attention_mask is None else jnp.asarray(attention_mask)
        if position_ids is None:
            position_ids = self.positions(input_ids, segment_ids)
        x_btd = self.embed[...][input_ids] + self.pos_embed[...][jnp.asarray(position_ids)]
        if cfg.type_vocab_size:
            types = jnp.zeros_like(input_ids) if token_type_ids is None else jnp.asarray(token_type_ids)
            x_btd = x_btd + self.type_embed[...][types]
        elif token_type_ids is not None:
            raise ModelError(f"{cfg.model_type} has no token types; pass token_type_ids=None")
        x_btd = layers.drop(dropout, self.embed_norm(x_btd), layers.Dropout.EMBED)
        x_btd = constrain(x_btd, layers.ACTIVATION)
        mask_bts = layers.attention_mask_bts(attention_mask, segment_ids, t, causal=False)

        def step(block, x_btd, index):
            out = block(x_btd, mask_bts, layers.for_layer(dropout, index), options)
            return constrain(out, layers.ACTIVATION)

        return layers.scan(self.layers, x_btd, jnp.arange(cfg.num_layers), step, options.remat)

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
        x_btd = self.hidden_states(
            input_ids, attention_mask, token_type_ids, position_ids, segment_ids, dropout, options
        )
        task = self.task.name
        if task == "base":
            return x_btd
        if task == "token_classification":
            return self.classifier(layers.drop(dropout, x_btd, layers.Dropout.HEAD))
        act = jnp.tanh if self.cfg.pooler_activation == "tanh" else jax.nn.relu
        pooled = act(self.pooler(x_btd[:, 0]))
        return self.classifier(layers.drop(dropout, pooled, layers.Dropout.HEAD))
