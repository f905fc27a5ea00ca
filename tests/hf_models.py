"""Tiny random transformers (PyTorch) models for parity tests, one per family variant and task."""

import numpy as np
import torch
import transformers

# The brief's parity tolerances against transformers, in one place for every test file; never relaxed.
ATOL_LOGITS = 1e-4  # float32 logits
ATOL_EXPORT = 1e-5  # export -> transformers round trip

BASE = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=64,
)

VARIANTS = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-tied-mqa": ("LlamaConfig", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama-bias": ("LlamaConfig", dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True)),
    "llama3-rope": (
        "LlamaConfig",
        dict(
            num_key_value_heads=2,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8,
            ),
        ),
    ),
    "llama-linear-rope": (
        "LlamaConfig",
        dict(num_key_value_heads=2, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)),
    ),
    "mistral-sliding": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=4, head_dim=16)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2-sliding": (
        "Qwen2Config",
        dict(
            num_key_value_heads=2,
            use_sliding_window=True,
            sliding_window=3,
            max_window_layers=1,
            tie_word_embeddings=False,
        ),
    ),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)),
    "gemma": ("GemmaConfig", dict(num_key_value_heads=1, head_dim=16)),
    "gemma2": (
        "Gemma2Config",
        dict(
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=4,
            query_pre_attn_scalar=12,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        ),
    ),
    "gpt2": ("GPT2Config", None),
}

ENCODERS = {
    "bert": ("BertConfig", dict(type_vocab_size=2)),
    # RoBERTa positions start at pad_token_id + 1, so the table needs two extra rows.
    "roberta": ("RobertaConfig", dict(type_vocab_size=1, pad_token_id=1, max_position_embeddings=66)),
    "distilbert": ("DistilBertConfig", None),
}

AUTO_CLASS = {
    "causal_lm": "AutoModelForCausalLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "token_classification": "AutoModelForTokenClassification",
    "base": "AutoModel",
}


def make_config(variant: str, **changes):
    """A tiny config; ``changes`` (num_labels, problem_type, pad_token_id, ...) are set on top."""
    cls, extra = {**VARIANTS, **ENCODERS}[variant]
    if variant == "gpt2":  # GPT-2 and DistilBERT name their fields differently.
        return transformers.GPT2Config(
            vocab_size=97,
            n_embd=32,
            n_layer=3,
            n_head=4,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
            **changes,
        )
    if variant == "distilbert":
        return transformers.DistilBertConfig(
            vocab_size=97, dim=32, n_layers=3, n_heads=4, hidden_dim=64, max_position_embeddings=64, **changes
        )
    return getattr(transformers, cls)(**{**BASE, **extra, **changes})


def make_model(
    variant: str, seed: int = 0, dtype=torch.float32, task: str = "causal_lm", attn=None, **changes
):
    """A random model for ``task`` whose every parameter (norms and biases included) is perturbed, so
    that a mix-up between any two tensors shows in the outputs. In eval mode: no dropout. ``attn``
    picks transformers' attention implementation ("eager", "sdpa"; None: its default)."""
    torch.manual_seed(seed)
    auto = getattr(transformers, AUTO_CLASS[task])
    model = auto.from_config(make_config(variant, **changes), attn_implementation=attn).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype)


def batch(vocab: int, seed: int = 0, pad_id=None, left=True):
    """ids [3, 11] with rows: full, right-padded, left-padded (or right-padded again when not ``left``);
    and the matching attention mask. With ``pad_id``, padding holds it and real tokens never do."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, (3, 11))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    if left:
        mask[2, :4] = 0
    else:
        mask[2, 9:] = 0
    if pad_id is not None:
        ids = np.where(ids == pad_id, (pad_id + 1) % vocab, ids)
        ids = np.where(mask == 1, ids, pad_id)
    return ids, mask


def hf_logits(model, ids, mask):
    """transformers logits with the positions jaxtune uses by default (left padding does not shift them)."""
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(
            torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        )
    return out.logits.float().numpy()
