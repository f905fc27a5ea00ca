"""Hugging Face ``model_type`` -> family module."""

from __future__ import annotations

from jaxtune.errors import ModelError
from jaxtune.models import bert, distilbert, gemma, gpt2, heads, llama

FAMILIES = {t: fam for fam in (llama, gemma, gpt2, bert, distilbert) for t in fam.MODEL_TYPES}


def family(model_type: str, where: str):
    """The family module for a model_type, or an error naming where it came from."""
    if model_type not in FAMILIES:
        raise ModelError(
            f"{where}: model_type {model_type!r} is not supported by jaxtune; "
            f"supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def class_name(fam, cfg, task) -> str:
    """The transformers class a model exports as (``LlamaForSequenceClassification``, ...)."""
    special = getattr(fam, "CLASS_NAMES", {})
    return special.get(task.name) or fam.CLASS_PREFIX[cfg.model_type] + heads.ARCHITECTURE_SUFFIX[task.name]
