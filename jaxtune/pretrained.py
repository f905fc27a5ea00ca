"""``load_pretrained`` / ``save_pretrained``: Hugging Face directories, hub ids and GGUF files in,
Hugging Face PyTorch-loadable directories out."""

from __future__ import annotations

import json
import os
import re
import socket

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune import hf
from jaxtune.models.decoder import CausalLM
from jaxtune.models.registry import family

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def _hub_snapshot(repo_id: str) -> str:
    """Local folder of a hub model: the cache when offline, a download when online; never a hang."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True)
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise FileNotFoundError(
            f"{repo_id!r} is not a local path and the Hugging Face hub is offline (HF_HUB_OFFLINE is set) "
            "with no cached copy; pass a local model directory or .gguf file, or download it while online"
        )
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError as e:
        raise ConnectionError(
            f"{repo_id!r} is not a local path and huggingface.co cannot be reached ({e}); "
            "pass a local model directory or .gguf file"
        ) from e
    return snapshot_download(repo_id, allow_patterns=HUB_FILES)


def resolve(path: str) -> str:
    """A local model directory or .gguf file for ``path`` (a directory, a .gguf file or a hub id)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return path
        raise ValueError(f"{path}: not a model; pass a model directory (with config.json) or a .gguf file")
    if HUB_ID.match(path):
        return _hub_snapshot(path)
    raise FileNotFoundError(f"{path}: no such model directory or .gguf file (hub ids look like org/name)")


def read_config(model_dir: str):
    """The transformers config of a model directory, with errors that name the file."""
    from transformers import AutoConfig

    config_path = os.path.join(model_dir, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(
            f"{model_dir}: not a Hugging Face model directory (no config.json); "
            "expected config.json + model.safetensors, or pass a .gguf file"
        )
    try:
        with open(config_path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from e
    if "model_type" not in raw:
        raise ValueError(f"{config_path}: has no model_type; is this a transformers config.json?")
    family(raw["model_type"], config_path)
    return AutoConfig.from_pretrained(model_dir)


def _by_path(state) -> dict:
    """Variables of a state keyed by dotted path (``layers.attn.q_proj.kernel``), as the tables name them."""
    return {".".join(map(str, k)): v for k, v in nnx.to_flat_state(state)}


def _build(family_mod, cfg, tensors, dtype):
    """Create the model abstractly, then fill each parameter from its checkpoint tensors."""
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    graphdef, state = nnx.split(abstract)
    by_name = _by_path(state)
    shapes = {path: var.shape for path, var in by_name.items()}
    for path, arr in hf.state_from_hf(tensors, family_mod, cfg, shapes, np.dtype(dtype)):
        by_name[path].set_value(jnp.asarray(arr))
    return nnx.merge(graphdef, state)


def load_pretrained(path, dtype=jnp.float32) -> CausalLM:
    """Load a pretrained model from a Hugging Face directory, a hub id or a GGUF file.

    The family comes from config.json's ``model_type``; weights map through the family's one table.
    Returns a model callable as ``model(input_ids, attention_mask=None) -> logits [b, t, vocab]``.
    """
    local = resolve(path)
    dtype = jnp.dtype(dtype)
    if local.endswith(".gguf"):
        from jaxtune import gguf

        hf_config, tensors = gguf.read(local)
    else:
        hf_config = read_config(local)
        tensors = hf.read_checkpoint(local)
    fam = family(hf_config.model_type, local)
    cfg = fam.config_from_hf(hf_config)
    return _build(fam, cfg, tensors, dtype)


def load_tokenizer(path):
    """The tokenizer of a model directory, hub id or GGUF file (transformers' fast tokenizer)."""
    local = resolve(path)
    if local.endswith(".gguf"):
        from jaxtune import gguf

        return gguf.tokenizer(local)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(local)


def model_state(model) -> dict[str, np.ndarray]:
    """Parameters of a model as host numpy arrays keyed by dotted path."""
    params = _by_path(nnx.state(model, nnx.Param))
    return {path: np.asarray(jax.device_get(v.get_value())) for path, v in params.items()}


def save_pretrained(model: CausalLM, out_dir, tokenizer=None, dtype=None, max_shard_bytes=hf.MAX_SHARD_BYTES):
    """Write config.json + safetensors (sharded with an index above 5 GB) + tokenizer files, so that
    ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads it with no missing keys."""
    cfg = model.cfg
    fam = family(cfg.model_type, "model")
    state = model_state(model)
    if dtype is not None:
        state = {k: v.astype(jnp.dtype(dtype)) for k, v in state.items()}
    out_dtype = str(jnp.dtype(next(iter(state.values())).dtype))
    os.makedirs(out_dir, exist_ok=True)
    config = json.loads(cfg.hf_config_json)
    config.pop("torch_dtype", None)
    config["dtype"] = out_dtype
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    hf.write_safetensors(out_dir, hf.state_to_hf(state, fam, cfg), max_shard_bytes)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
