"""DistilBERT: a BERT without token types or pooler, under its own key names; its sequence-classification
head is ``pre_classifier`` (relu) -> ``classifier``."""

from __future__ import annotations

import json

from jaxtune.models import heads
from jaxtune.models.encoder import Encoder, EncoderConfig
from jaxtune.models.weights import IDENT, LINEAR_IN2, dense, layer_norm

MODEL = Encoder
MODEL_TYPES = ("distilbert",)
CLASS_PREFIX = {"distilbert": "DistilBert"}
KEY_PREFIX = {"distilbert": "distilbert."}
IGNORED_KEYS = (r".*embeddings\.position_ids",)
TIED_KEYS = ()
HEAD_KEYS = (
    r"vocab_(transform|layer_norm|projector)\..*",
    r"pre_classifier\..*",
    r"(classifier|qa_outputs)\..*",
)


def config_from_hf(hf) -> EncoderConfig:
    return EncoderConfig(
        model_type="distilbert",
        vocab_size=hf.vocab_size,
        hidden_size=hf.dim,
        intermediate_size=hf.hidden_dim,
        num_layers=hf.n_layers,
        num_heads=hf.n_heads,
        activation=hf.activation,
        norm_eps=1e-12,  # fixed in transformers' DistilBERT, not read from the config
        max_positions=hf.max_position_embeddings,
        type_vocab_size=0,
        pad_token_id=hf.pad_token_id if hf.pad_token_id is not None else 0,
        base_pooler=False,
        pooler_activation="relu",
        init_std=hf.initializer_range,
        hf_config_json=json.dumps(hf.to_dict()),
    )


def hf_table(cfg: EncoderConfig, task: heads.Task) -> tuple:
    emb, layer = "distilbert.embeddings.", "distilbert.transformer.layer.{i}."
    return (
        (emb + "word_embeddings.weight", "embed", IDENT),
        (emb + "position_embeddings.weight", "pos_embed", IDENT),
        *layer_norm(emb + "LayerNorm", "embed_norm"),
        *dense(layer + "attention.q_lin", "layers.attn.q_proj"),
        *dense(layer + "attention.k_lin", "layers.attn.k_proj"),
        *dense(layer + "attention.v_lin", "layers.attn.v_proj"),
        *dense(layer + "attention.out_lin", "layers.attn.o_proj", LINEAR_IN2),
        *layer_norm(layer + "sa_layer_norm", "layers.attn_norm"),
        *dense(layer + "ffn.lin1", "layers.mlp.up_proj"),
        *dense(layer + "ffn.lin2", "layers.mlp.down_proj"),
        *layer_norm(layer + "output_layer_norm", "layers.mlp_norm"),
        *dense("pre_classifier", "pooler"),
        *dense("classifier", "classifier"),
    )
