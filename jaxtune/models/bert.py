"""BERT (MiniLM and other small BERTs too) and RoBERTa: the same encoder under two key prefixes.

RoBERTa differs only in its position ids (counted from pad_token_id + 1, see EncoderConfig), a single
token type, and the names of its sequence-classification head (``classifier.dense`` /
``classifier.out_proj`` where BERT has ``bert.pooler.dense`` / ``classifier``).
"""

from __future__ import annotations

import json

from jaxtune.errors import ModelError
from jaxtune.models import heads
from jaxtune.models.encoder import Encoder, EncoderConfig
from jaxtune.models.weights import IDENT, LINEAR_IN2, dense, layer_norm

MODEL = Encoder
MODEL_TYPES = ("bert", "roberta")
CLASS_PREFIX = {"bert": "Bert", "roberta": "Roberta"}
KEY_PREFIX = {"bert": "bert.", "roberta": "roberta."}
# Non-persistent buffers that older checkpoints still carry.
IGNORED_KEYS = (r".*embeddings\.position_ids", r".*embeddings\.token_type_ids")
TIED_KEYS = ()
# Pre-training, masked-LM, question-answering and classification heads, and the pooler, which
# token classification does not use.
HEAD_KEYS = (
    r"cls\..*",
    r"lm_head\..*",
    r"classifier\..*",
    r"qa_outputs\..*",
    r"(bert|roberta)\.pooler\..*",
)
# TensorFlow-era checkpoints (bert-base-uncased among them) name LayerNorm parameters gamma/beta.
KEY_RENAMES = ((r"LayerNorm\.gamma$", "LayerNorm.weight"), (r"LayerNorm\.beta$", "LayerNorm.bias"))


def config_from_hf(hf) -> EncoderConfig:
    position_type = getattr(hf, "position_embedding_type", None) or "absolute"
    if position_type != "absolute":
        raise ModelError(
            f"config.json sets position_embedding_type={position_type!r}; jaxtune (like transformers 5) "
            "supports only 'absolute'"
        )
    if getattr(hf, "is_decoder", False) or getattr(hf, "add_cross_attention", False):
        raise ModelError("config.json sets is_decoder/add_cross_attention; jaxtune's BERT is an encoder only")
    return EncoderConfig(
        model_type=hf.model_type,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        activation=hf.hidden_act,
        norm_eps=hf.layer_norm_eps,
        max_positions=hf.max_position_embeddings,
        type_vocab_size=hf.type_vocab_size,
        roberta_positions=hf.model_type == "roberta",
        pad_token_id=hf.pad_token_id if hf.pad_token_id is not None else 0,
        init_std=hf.initializer_range,
        hf_config_json=json.dumps(hf.to_dict()),
    )


def hf_table(cfg: EncoderConfig, task: heads.Task) -> tuple:
    p = KEY_PREFIX[cfg.model_type]
    layer = p + "encoder.layer.{i}."
    att = layer + "attention."
    return (
        (p + "embeddings.word_embeddings.weight", "embed", IDENT),
        (p + "embeddings.position_embeddings.weight", "pos_embed", IDENT),
        (p + "embeddings.token_type_embeddings.weight", "type_embed", IDENT),
        *layer_norm(p + "embeddings.LayerNorm", "embed_norm"),
        *dense(att + "self.query", "layers.attn.q_proj"),
        *dense(att + "self.key", "layers.attn.k_proj"),
        *dense(att + "self.value", "layers.attn.v_proj"),
        *dense(att + "output.dense", "layers.attn.o_proj", LINEAR_IN2),
        *layer_norm(att + "output.LayerNorm", "layers.attn_norm"),
        *dense(layer + "intermediate.dense", "layers.mlp.up_proj"),
        *dense(layer + "output.dense", "layers.mlp.down_proj"),
        *layer_norm(layer + "output.LayerNorm", "layers.mlp_norm"),
        *head_entries(cfg, task),
    )


def head_entries(cfg: EncoderConfig, task: heads.Task) -> tuple:
    if cfg.model_type == "roberta" and task.name == "sequence_classification":
        return (*dense("classifier.dense", "pooler"), *dense("classifier.out_proj", "classifier"))
    return (*dense(KEY_PREFIX[cfg.model_type] + "pooler.dense", "pooler"), *dense("classifier", "classifier"))
