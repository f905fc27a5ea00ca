"""GPT-2: LayerNorm, learned positions, a fused qkv projection and Conv1D weights stored [in, out]."""

from __future__ import annotations

import json

from jaxtune.errors import ModelError
from jaxtune.models import heads
from jaxtune.models.decoder import Decoder, DecoderConfig
from jaxtune.models.decoder_family import head_entries, pad_token_id
from jaxtune.models.weights import CONV1D, CONV1D_IN2, IDENT, dense, layer_norm

MODEL = Decoder
MODEL_TYPES = ("gpt2",)
CLASS_PREFIX = {"gpt2": "GPT2"}
CLASS_NAMES = {"causal_lm": "GPT2LMHeadModel"}  # where the name is not prefix + task suffix
# Checkpoints of the bare GPT2Model have no ``transformer.`` prefix.
KEY_PREFIX = {"gpt2": "transformer."}
# The causal-mask buffers of old checkpoints (``h.0.attn.bias``), not the c_attn/c_proj biases.
IGNORED_KEYS = (r".*\.attn\.(masked_)?bias",)
TIED_KEYS = ("lm_head.weight",)
HEAD_KEYS = (r"lm_head\..*", r"score\..*", r"classifier\..*", r"qa_outputs\..*", r"multiple_choice_head\..*")


def config_from_hf(hf) -> DecoderConfig:
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if getattr(hf, flag, False):
            raise ModelError(f"config.json sets {flag}=true, which jaxtune's GPT-2 does not support")
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
        pad_token_id=pad_token_id(hf),
        hf_config_json=json.dumps(hf.to_dict()),
    )


def hf_table(cfg: DecoderConfig, task: heads.Task) -> tuple:
    h = "transformer.h.{i}."
    # The tied LM head has no tensor of its own.
    head = () if task.name == "causal_lm" else head_entries(task, token_classifier="classifier")
    return (
        *head,
        ("transformer.wte.weight", "embed", IDENT),
        ("transformer.wpe.weight", "pos_embed", IDENT),
        *layer_norm("transformer.ln_f", "final_norm"),
        *layer_norm(h + "ln_1", "layers.attn_norm"),
        *layer_norm(h + "ln_2", "layers.mlp_norm"),
        *dense(h + "attn.c_attn", "layers.attn.qkv_proj", CONV1D),
        *dense(h + "attn.c_proj", "layers.attn.o_proj", CONV1D_IN2),
        *dense(h + "mlp.c_fc", "layers.mlp.up_proj", CONV1D),
        *dense(h + "mlp.c_proj", "layers.mlp.down_proj", CONV1D),
    )
