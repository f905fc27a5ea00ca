"""What the decoder families share: the config fields Llama-like config.json files name the same way,
and the pieces of their weight-name tables. Each family's own table (``hf_table``) is built from these
in its own file; no family imports another.
"""

from __future__ import annotations

import json

from jaxtune.models import heads
from jaxtune.models.weights import FLAT, LINEAR, LINEAR_IN2, dense

# Buffers some older checkpoints carry; they hold no parameter.
IGNORED_KEYS = (r".*\.rotary_emb\.inv_freq",)
# A tied checkpoint may still store the head; it is the embedding.
TIED_KEYS = ("lm_head.weight",)
# Weights of task heads: a model built for another task drops them, with a warning.
HEAD_KEYS = (r"lm_head\..*", r"score\..*", r"qa_outputs\..*")


def windows_from_hf(hf) -> tuple:
    """Per-layer sliding window (0 = global) from ``layer_types`` / ``sliding_window``."""
    n, window = hf.num_hidden_layers, getattr(hf, "sliding_window", None) or 0
    layer_types = getattr(hf, "layer_types", None)
    if layer_types:
        return tuple(window if kind == "sliding_attention" else 0 for kind in layer_types)
    if hf.model_type == "mistral":
        return (window,) * n
    return (0,) * n


def rope_from_hf(hf) -> tuple:
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    if "rope_theta" not in rope:
        rope["rope_theta"] = getattr(hf, "rope_theta", 10000.0)
    return tuple(sorted(rope.items()))


def shared_fields(hf) -> dict:
    """DecoderConfig fields that Llama-like configs (Llama, Mistral, Qwen, Gemma) name the same way."""
    heads = hf.num_attention_heads
    return dict(
        model_type=hf.model_type,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
        norm_eps=hf.rms_norm_eps,
        max_positions=hf.max_position_embeddings,
        rope=rope_from_hf(hf),
        windows=windows_from_hf(hf),
        tie_embeddings=bool(hf.tie_word_embeddings),
        init_std=getattr(hf, "initializer_range", 0.02),
        pad_token_id=pad_token_id(hf),
        hf_config_json=json.dumps(hf.to_dict()),
    )


def pad_token_id(hf) -> int:
    pad = getattr(hf, "pad_token_id", None)
    return -1 if pad is None else int(pad)


def attention_entries(layer: str) -> tuple:
    att = layer + "self_attn."
    return (
        *((f"{att}{p}_proj.weight", f"layers.attn.{p}_proj.kernel", LINEAR) for p in "qkv"),
        *((f"{att}{p}_proj.bias", f"layers.attn.{p}_proj.bias", FLAT) for p in "qkvo"),
        (att + "o_proj.weight", "layers.attn.o_proj.kernel", LINEAR_IN2),
        (att + "q_norm.weight", "layers.attn.q_norm.weight", FLAT),
        (att + "k_norm.weight", "layers.attn.k_norm.weight", FLAT),
    )


def gated_mlp_entries(layer: str) -> tuple:
    return tuple(
        e for p in ("gate", "up", "down") for e in dense(f"{layer}mlp.{p}_proj", f"layers.mlp.{p}_proj")
    )


def head_entries(task: heads.Task, token_classifier: str = "score") -> tuple:
    """The task head of a decoder: ``lm_head``, or transformers' ``score`` layer (GPT-2 names its token
    classifier ``classifier``)."""
    if task.name == "causal_lm":
        return (("lm_head.weight", "lm_head", LINEAR),)
    if task.name == "sequence_classification":
        return (("score.weight", "score.kernel", LINEAR),)
    if task.name == "token_classification":
        return dense(token_classifier, "score")
    return ()
