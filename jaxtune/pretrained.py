"""``load_pretrained`` / ``save_pretrained``: Hugging Face directories, hub ids and GGUF files in,
Hugging Face PyTorch-loadable directories out."""

from __future__ import annotations

import json
import logging
import os
import re
import socket

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune import hf
from jaxtune.models import heads
from jaxtune.models.encoder import Encoder
from jaxtune.models.registry import class_name, family

log = logging.getLogger(__name__)
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


def _head_layer(path: str) -> bool:
    """Whether a parameter belongs to the label-sized layer of a classification head."""
    return path.split(".")[0] in ("score", "classifier")


def _build(fam, cfg, task: heads.Task, tensors, dtype, seed: int, new_head: bool):
    """Create the model abstractly, fill each parameter from its checkpoint tensor, and initialise the
    head parameters the checkpoint does not have (seeded, as transformers initialises them)."""
    abstract = nnx.eval_shape(lambda: fam.MODEL(cfg, task, rngs=nnx.Rngs(seed), dtype=dtype))
    graphdef, state = nnx.split(abstract)
    by_name = _by_path(state)
    shapes = {path: var.shape for path, var in by_name.items()}
    fresh_heads = fam.MODEL.make_head(cfg, task, rngs=nnx.Rngs(seed), dtype=dtype)
    head_paths = {path for path in shapes if path.split(".")[0] in fresh_heads}
    table = fam.hf_table(cfg, task)
    if new_head:
        table = [entry for entry in table if not _head_layer(entry[1])]
    loaded = set()
    for path, arr in hf.state_from_hf(tensors, fam, cfg, table, shapes, np.dtype(dtype), fresh=head_paths):
        by_name[path].set_value(jnp.asarray(arr))
        loaded.add(path)
    fresh = sorted(head_paths - loaded)
    if fresh:
        init = {
            f"{name}.{sub}": v
            for name, mod in fresh_heads.items()
            for sub, v in _by_path(nnx.state(mod)).items()
        }
        for path in fresh:
            by_name[path].set_value(init[path].get_value())
        log.warning(
            "%s head with %d label(s) %s initialised from seed %d, not in the checkpoint: %s; train it",
            task.name,
            task.num_labels,
            list(task.labels),
            seed,
            ", ".join(fresh),
        )
    return nnx.merge(graphdef, state)


def resolve_task(
    hf_config, fam, where: str, task=None, num_labels=None, id2label=None, problem_type=None, new_head=False
):
    """The :class:`heads.Task` to build: ``task`` if given, else the one config.json's ``architectures``
    names (a bare encoder is ``base``, a bare decoder ``causal_lm``)."""
    encoder = fam.MODEL is Encoder
    saved = heads.task_from_architecture(
        getattr(hf_config, "architectures", None), "base" if encoder else "causal_lm"
    )
    if encoder and saved == "causal_lm":  # BertLMHeadModel and the like: jaxtune keeps the encoder
        saved = "base"
    name = task or saved
    if name not in heads.TASKS:
        raise ValueError(f"unknown task {name!r}; use one of {', '.join(heads.TASKS)}")
    if name not in heads.CLASSIFICATION:
        if num_labels is not None or id2label is not None:
            raise ValueError(f"num_labels / id2label apply to classification tasks, not {name!r}")
        return heads.Task(name)
    has_head = name == saved and not new_head
    if num_labels is None and id2label is None:
        labels = heads.labels_from(hf_config=hf_config)
    else:
        labels = heads.labels_from(num_labels, id2label)
        saved_labels = heads.labels_from(hf_config=hf_config)
        if has_head and len(labels) != len(saved_labels):
            raise ValueError(
                f"{where}: the checkpoint's {name} head has {len(saved_labels)} labels {list(saved_labels)}, "
                f"but {len(labels)} were asked for; omit num_labels/id2label to use the checkpoint's head, "
                "or pass new_head=True to replace it with a freshly initialised one"
            )
    problem_type = (
        problem_type or getattr(hf_config, "problem_type", None) or heads.default_problem_type(labels)
    )
    return heads.Task(name, labels, problem_type)


def load_pretrained(
    path,
    dtype=jnp.float32,
    *,
    task=None,
    num_labels=None,
    id2label=None,
    problem_type=None,
    new_head=False,
    seed=0,
):
    """Load a pretrained model from a Hugging Face directory, a hub id or a GGUF file.

    The family comes from config.json's ``model_type``; weights map through the family's one table.
    ``task`` is ``causal_lm``, ``sequence_classification``, ``token_classification`` or ``base``; by
    default the one config.json's ``architectures`` names. A checkpoint with the task's head loads it
    (``num_labels`` must then match it, unless ``new_head=True`` asks for a fresh one); otherwise the head
    is initialised from ``seed`` as transformers would, with ``num_labels`` / ``id2label`` labels and
    ``problem_type`` (single_label_classification, multi_label_classification or regression).

    Returns a model callable as ``model(input_ids, attention_mask=None, token_type_ids=None)`` giving
    logits ``[b, t, vocab]``, ``[b, labels]`` or ``[b, t, labels]``, or hidden states for ``base``.
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
    spec = resolve_task(hf_config, fam, local, task, num_labels, id2label, problem_type, new_head)
    return _build(fam, cfg, spec, tensors, dtype, seed, new_head)


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


def save_pretrained(model, out_dir, tokenizer=None, dtype=None, max_shard_bytes=hf.MAX_SHARD_BYTES):
    """Write config.json + safetensors (sharded with an index above 5 GB) + tokenizer files, so that
    ``transformers.AutoModelFor<Task>.from_pretrained(out_dir)`` loads it with no missing keys.

    config.json names the task's transformers class in ``architectures`` and, for classifiers, carries
    ``id2label``, ``label2id`` and ``problem_type``."""
    cfg, task = model.cfg, model.task
    fam = family(cfg.model_type, "model")
    state = model_state(model)
    if dtype is not None:
        state = {k: v.astype(jnp.dtype(dtype)) for k, v in state.items()}
    out_dtype = str(jnp.dtype(next(iter(state.values())).dtype))
    os.makedirs(out_dir, exist_ok=True)
    config = json.loads(cfg.hf_config_json)
    config.pop("torch_dtype", None)
    config["dtype"] = out_dtype
    config["architectures"] = [class_name(fam, cfg, task)]
    config.update(heads.config_fields(task))
    if (
        task.name == "sequence_classification"
        and config.get("pad_token_id") is None
        and tokenizer is not None
    ):
        # transformers' decoder classifiers find the last token through pad_token_id.
        config["pad_token_id"] = tokenizer.pad_token_id
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    hf.write_safetensors(out_dir, hf.state_to_hf(state, fam.hf_table(cfg, task)), max_shard_bytes)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
