"""jaxtune: fine-tune and pre-train pretrained language models with JAX and Flax NNX."""

from jaxtune.generate import generate, generate_ids
from jaxtune.pretrained import load_pretrained, load_tokenizer, save_pretrained

__all__ = ["generate", "generate_ids", "load_pretrained", "load_tokenizer", "save_pretrained"]
