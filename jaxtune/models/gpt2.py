"""GPT-2: LayerNorm, learned positions, a fused qkv projection and Conv1D weights stored [in, out]."""

from __future__ import annotations

import json

from jaxtune.models.decoder import DecoderConfig
from jaxtune.models.weights import CONV1D, CONV1D_IN2, FLAT, IDENT

MODEL_TYPES = ("gpt2",)
# The causal-mask buffers of old checkpoints (``h.0.attn.bias``), not the c_attn/c_proj biases.
IGNORED_KEYS = (r".*\.attn\.(masked_)?bias",)
TIED_KEYS = ("lm_head.weight",)
# Checkpoints of the bare GPT2Model have no ``transformer.`` prefix.
KEY_PREFIX = "transformer."


def config_from_hf(hf) -> DecoderConfig:
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if getattr(hf, flag, False):
            raise ValueError(f"config.json sets {flag}=true, which jaxtune's GPT-2 does not support")
    d, heads = hf.n_embd, hf.n_head
    return DecoderConfig(
        model_type="gpt2",
        vocab_size=hf.vocab_size,
        hidden_size=d,
        intermediate_size=hf.n_inner or 4 * d,
        num_layers=hf.n_layer,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=d // heads,
        norm="layer",
        norm_eps=hf.layer_norm_epsilon,
        activation=hf.activation_function,
        gated_mlp=False,
        position="learned",
        max_positions=hf.n_positions,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        fused_qkv=True,
        attn_scale=(d // heads) ** -0.5 if hf.scale_attn_weights else 1.0,
        tie_embeddings=True,
        init_std=hf.initializer_range,
        hf_config_json=json.dumps(hf.to_dict()),
    )


def hf_table(cfg: DecoderConfig) -> tuple:
    h = "transformer.h.{i}."
    return (
        ("transformer.wte.weight", "embed", IDENT),
        ("transformer.wpe.weight", "pos_embed", IDENT),
        ("transformer.ln_f.weight", "final_norm.weight", FLAT),
        ("transformer.ln_f.bias", "final_norm.bias", FLAT),
        (h + "ln_1.weight", "layers.attn_norm.weight", FLAT),
        (h + "ln_1.bias", "layers.attn_norm.bias", FLAT),
        (h + "ln_2.weight", "layers.mlp_norm.weight", FLAT),
        (h + "ln_2.bias", "layers.mlp_norm.bias", FLAT),
        (h + "attn.c_attn.weight", "layers.attn.qkv_proj.kernel", CONV1D),
        (h + "attn.c_attn.bias", "layers.attn.qkv_proj.bias", FLAT),
        (h + "attn.c_proj.weight", "layers.attn.o_proj.kernel", CONV1D_IN2),
        (h + "attn.c_proj.bias", "layers.attn.o_proj.bias", FLAT),
        (h + "mlp.c_fc.weight", "layers.mlp.up_proj.kernel", CONV1D),
        (h + "mlp.c_fc.bias", "layers.mlp.up_proj.bias", FLAT),
        (h + "mlp.c_proj.weight", "layers.mlp.down_proj.kernel", CONV1D),
        (h + "mlp.c_proj.bias", "layers.mlp.down_proj.bias", FLAT),
    )
