"""Llama 1/2/3, Mistral, Qwen2/2.5 and Qwen3: one architecture with a few switches.

Differences handled here: Llama-3 rope scaling (through ``rope_parameters``), Qwen2's q/k/v bias,
Qwen3's q/k RMSNorm, Mistral's and Qwen's sliding-window layers, tied or untied embeddings.
"""

from __future__ import annotations

from jaxtune.models import heads
from jaxtune.models.decoder import Decoder, DecoderConfig
from jaxtune.models.decoder_family import (  # noqa: F401  (HEAD_KEYS, IGNORED_KEYS, TIED_KEYS: the family's)
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
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# transformers class names are this prefix + the task's suffix (LlamaForCausalLM, ...).
CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
# The base model's attribute name; a bare LlamaModel checkpoint stores its keys without it.
KEY_PREFIX = dict.fromkeys(MODEL_TYPES, "model.")


def config_from_hf(hf) -> DecoderConfig:
    kind = hf.model_type
    bias = bool(getattr(hf, "attention_bias", False))
    return DecoderConfig(
        **shared_fields(hf),
        norm="rms",
        activation=hf.hidden_act,
        qkv_bias=True if kind == "qwen2" else bias,
        o_bias=False if kind == "qwen2" else bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        qk_norm=kind == "qwen3",
    )


def hf_table(cfg: DecoderConfig, task: heads.Task) -> tuple:
    """Hugging Face key template -> (our parameter path, transform). ``{i}`` is the layer index."""
    layer = "model.layers.{i}."
    return (
        ("model.embed_tokens.weight", "embed", IDENT),
        ("model.norm.weight", "final_norm.weight", FLAT),
        *head_entries(task),
        (layer + "input_layernorm.weight", "layers.attn_norm.weight", FLAT),
        (layer + "post_attention_layernorm.weight", "layers.mlp_norm.weight", FLAT),
        *attention_entries(layer),
        *gated_mlp_entries(layer),
    )
