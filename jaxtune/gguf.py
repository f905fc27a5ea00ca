"""GGUF (llama.cpp) files: dequantize the tensors, rename them to Hugging Face keys, rebuild the
config and the tokenizer, so a model distributed only as GGUF can be loaded and fine-tuned."""

from __future__ import annotations

import numpy as np

from jaxtune.errors import ModelError
from jaxtune.hf import Tensors

# GGUF tensor name -> Hugging Face key, for the llama architecture (Llama, Mistral, SmolLM, ...).
LLAMA_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def _reader(path: str):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:
        raise ModelError(f"{path}: not a readable GGUF file ({e})") from e


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _hf_name(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] == "blk":
        template = "blk.{i}." + ".".join(parts[2:])
        target = LLAMA_NAMES.get(template)
        return target.format(i=parts[1]) if target else None
    return LLAMA_NAMES.get(name)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp interleaves the two rotary halves of each q/k head; restore the rotate-half layout."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _blocks(read_one, shape: bool = False):
    """A dequantised tensor, whole (quantised blocks cannot be sliced), cut to the block asked for.
    The last tensor is kept: its shape is asked for just before it is read."""
    last = {}

    def whole(key):
        if key not in last:
            last.clear()
            last[key] = read_one(key)
        return last[key]

    if shape:
        return lambda key: whole(key).shape
    return lambda key, index: whole(key) if index is None else whole(key)[index]


def read(path: str):
    """(transformers config, lazily dequantized tensors under Hugging Face keys) of a GGUF file."""
    import gguf
    from transformers import LlamaConfig

    reader = _reader(path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelError(f"{path}: GGUF architecture {arch!r} is not supported; supported: llama")
    heads = int(_field(reader, "llama.attention.head_count"))
    kv_heads = int(_field(reader, "llama.attention.head_count_kv", heads))
    tensors = {t.name: t for t in reader.tensors}
    readers, unknown = {}, []
    for name, t in tensors.items():
        key = _hf_name(name)
        if key is None:
            unknown.append(name)
            continue

        def read_one(_, t=t, name=name):
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            if name.endswith("attn_q.weight"):
                w = _unpermute(w, heads)
            elif name.endswith("attn_k.weight"):
                w = _unpermute(w, kv_heads)
            return w

        readers[key] = (path, _blocks(read_one), _blocks(read_one, shape=True))
    if unknown:
        raise ModelError(f"{path}: GGUF tensors jaxtune cannot map: {', '.join(unknown)}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    hidden = int(_field(reader, "llama.embedding_length"))
    config = LlamaConfig(
        vocab_size=int(_field(reader, "llama.vocab_size", len(tokens))),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_field(reader, "llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": float(_field(reader, "llama.rope.freq_base", 1e4)),
        },
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        architectures=["LlamaForCausalLM"],
    )
    return config, Tensors(readers)


def tokenizer(path: str):
    """A transformers fast tokenizer rebuilt from the GGUF vocabulary, merges and chat template.

    Supports ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE). The ``smollm`` / ``starcoder``
    pre-tokenizers split digits individually before the byte-level split, as their original
    tokenizer.json files do.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    reader = _reader(path)
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelError(
            f"{path}: GGUF tokenizer model {kind!r} is not supported; supported: gpt2 (byte-level BPE)"
        )
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if _field(reader, "tokenizer.ggml.pre") in ("smollm", "starcoder", "refact"):
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Token type 3 is "control" in llama.cpp: these are the special tokens.
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty == 3
        ]
    )

    def token(key):
        i = _field(reader, key)
        return None if i is None else tokens[int(i)]

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        unk_token=token("tokenizer.ggml.unknown_token_id"),
        pad_token=token("tokenizer.ggml.padding_token_id"),
        chat_template=_field(reader, "tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )
