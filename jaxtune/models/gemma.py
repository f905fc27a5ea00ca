"""Gemma and Gemma 2.

Gemma: embeddings scaled by sqrt(hidden_size), RMSNorm with a ``1 + w`` scale, GeGLU MLP, tied
embeddings. Gemma 2 adds norms after attention and MLP, attention and final logit soft-capping,
``query_pre_attn_scalar`` as the attention scale, and alternating sliding-window layers.
"""

from __future__ import annotations

from jaxtune.models import heads
from jaxtune.models.decoder import Decoder, DecoderConfig
from jaxtune.models.decoder_family import (  # noqa: F401  (HEAD_KEYS, IGNORED_KEYS, TIED_KEYS: same as Llama's)
    HEAD_KEYS,
    IGNORED_KEYS,
    TIED_KEYS,
    attention_entries,
    gated_mlp_entries,
    head_entries,
    shared_fields,
)
from jaxtune.models.weights import FLAT, IDENT

MODEL = Decoder
MODEL_TYPES = ("gemma", "gemma2")
CLASS_PREFIX = {"gemma": "Gemma", "gemma2": "Gemma2"}
KEY_PREFIX = dict.fromkeys(MODEL_TYPES, "model.")


def config_from_hf(hf) -> DecoderConfig:
    v2 = hf.model_type == "gemma2"
    fields = shared_fields(hf)
    bias = bool(getattr(hf, "attention_bias", False))
    return DecoderConfig(
        **fields,
        norm="rms_one",
        # Gemma checkpoints say hidden_act "gelu" but transformers runs the tanh approximation.
        activation=getattr(hf, "hidden_activation", None) or "gelu_pytorch_tanh",
        qkv_bias=bias,
        o_bias=bias,
        sandwich_norm=v2,
        embed_scale=True,
        attn_scale=hf.query_pre_attn_scalar**-0.5 if v2 else fields["head_dim"] ** -0.5,
        attn_softcap=(getattr(hf, "attn_logit_softcapping", None) or 0.0) if v2 else 0.0,
        final_softcap=(getattr(hf, "final_logit_softcapping", None) or 0.0) if v2 else 0.0,
    )


def hf_table(cfg: DecoderConfig, task: heads.Task) -> tuple:
    layer = "model.layers.{i}."
    if cfg.sandwich_norm:
        norms = (
            (layer + "input_layernorm.weight", "layers.attn_norm.weight", FLAT),
            (layer + "post_attention_layernorm.weight", "layers.post_attn_norm.weight", FLAT),
            (layer + "pre_feedforward_layernorm.weight", "layers.mlp_norm.weight", FLAT),
            (layer + "post_feedforward_layernorm.weight", "layers.post_mlp_norm.weight", FLAT),
        )
    else:
        norms = (
            (layer + "input_layernorm.weight", "layers.attn_norm.weight", FLAT),
            (layer + "post_attention_layernorm.weight", "layers.mlp_norm.weight", FLAT),
        )
    return (
        ("model.embed_tokens.weight", "embed", IDENT),
        ("model.norm.weight", "final_norm.weight", FLAT),
        *head_entries(task),
        *norms,
        *attention_entries(layer),
        *gated_mlp_entries(layer),
    )
