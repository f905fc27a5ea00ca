"""Hugging Face ``model_type`` -> family module."""

from __future__ import annotations

from jaxtune.models import gemma, gpt2, llama

FAMILIES = {t: fam for fam in (llama, gemma, gpt2) for t in fam.MODEL_TYPES}


def family(model_type: str, where: str):
    """The family module for a model_type, or an error naming where it came from."""
    if model_type not in FAMILIES:
        raise ValueError(
            f"{where}: model_type {model_type!r} is not supported by jaxtune; "
            f"supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]
