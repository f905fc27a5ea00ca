"""``load_pretrained`` / ``save_pretrained``: Hugging Face directories, hub ids and GGUF files in,
Hugging Face PyTorch-loadable directories out."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import socket

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune import fs, hf, sharding
from jaxtune.errors import ModelError, ModelNotFound, first_line
from jaxtune.models import heads
from jaxtune.models import lora as adapters
from jaxtune.models.encoder import Encoder
from jaxtune.models.registry import class_name, family

log = logging.getLogger(__name__)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
LORA_SPEC = "lora.json"  # in a run's model/ directory: the adapters its checkpoints hold
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def _hub_snapshot(repo_id: str) -> str:
    """Local folder of a hub model: the cache when offline, a download when online; never a hang."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True)
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ModelNotFound(
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
        raise ModelError(f"{path}: not a model; pass a model directory (with config.json) or a .gguf file")
    if HUB_ID.match(path):
        return _hub_snapshot(path)
    raise ModelNotFound(f"{path}: no such model directory or .gguf file (hub ids look like org/name)")


def read_config(model_dir: str):
    """The transformers config of a model directory, with errors that name the file."""
    from transformers import AutoConfig

    config_path = os.path.join(model_dir, "config.json")
    if not os.path.exists(config_path):
        raise ModelNotFound(
            f"{model_dir}: not a Hugging Face model directory (no config.json); "
            "expected config.json + model.safetensors, or pass a .gguf file"
        )
    try:
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
    except UnicodeDecodeError as e:
        raise ModelError(
            f"{config_path}: not UTF-8 text (byte offset {e.start}); is it a config.json?"
        ) from e
    except json.JSONDecodeError as e:
        raise ModelError(f"{config_path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ModelError(f"{config_path}: has no model_type; is this a transformers config.json?")
    family(raw["model_type"], config_path)
    try:
        # trust_remote_code=False: jaxtune builds its own model from the config and never runs code
        # from a model directory.
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise ModelError(f"{config_path}: transformers cannot read it ({first_line(e)}); fix the file") from e


def by_path(state) -> dict:
    """Variables of a state keyed by dotted path (``layers.attn.q_proj.kernel``), as the tables name them."""
    return {".".join(map(str, k)): v for k, v in nnx.to_flat_state(state)}


def _head_layer(path: str) -> bool:
    """Whether a parameter belongs to the label-sized layer of a classification head."""
    return path.split(".")[0] in ("score", "classifier")


def _build(
    fam, cfg, task: heads.Task, tensors, dtype, seed: int, new_head: bool, mesh=None, rules=(), lora=None
):
    """Create the model abstractly, fill each parameter from its checkpoint tensor, and initialise the
    head parameters the checkpoint does not have (seeded, as transformers initialises them).

    With a ``mesh``, each parameter goes straight into its shards (``rules`` map logical axis names to
    mesh axes): each device's block is read from the checkpoint alone (per layer of a stacked
    ``[layers, ...]`` parameter), so a host reads and holds its devices' share of the model, never all
    of it. ``lora``: a :class:`lora.LoraSpec` whose adapters start as they always do (B zero)."""
    abstract = nnx.eval_shape(lambda: fam.MODEL(cfg, task, rngs=nnx.Rngs(seed), dtype=dtype, lora=lora))
    graphdef, state = nnx.split(abstract)
    by_name = by_path(state)

    def place(path, value):  # a checkpoint's LazyParam, or a freshly initialised head's array
        lazy = isinstance(value, hf.LazyParam)
        if mesh is None:
            return jnp.asarray(value.read() if lazy else value)
        where = sharding.param_sharding(by_name[path], mesh, rules)
        return sharding.put_blocks(value, where) if lazy else sharding.put(np.asarray(value), where)

    shapes = {path: var.shape for path, var in by_name.items() if not adapters.is_adapter(path)}
    fresh_heads = fam.MODEL.make_head(cfg, task, rngs=nnx.Rngs(seed), dtype=dtype)
    head_paths = {path for path in shapes if path.split(".")[0] in fresh_heads}
    table = fam.hf_table(cfg, task)
    if new_head:
        table = [entry for entry in table if not _head_layer(entry[1])]
    loaded = set()
    for path, arr in hf.state_from_hf(tensors, fam, cfg, table, shapes, np.dtype(dtype), fresh=head_paths):
        by_name[path].set_value(place(path, arr))
        loaded.add(path)
    fresh = sorted(head_paths - loaded)
    if fresh:
        init = {
            f"{name}.{sub}": v
            for name, mod in fresh_heads.items()
            for sub, v in by_path(nnx.state(mod)).items()
        }
        for path in fresh:
            by_name[path].set_value(place(path, init[path].get_value()))
        log.warning(
            "%s head with %d label(s) %s initialised from seed %d, not in the checkpoint: %s; train it",
            task.name,
            task.num_labels,
            list(task.labels),
            seed,
            ", ".join(fresh),
        )
    for path, module in adapters.targeted(abstract, lora) if lora is not None else ():
        for name, (_, _, value) in adapters.first_values(module, path, lora).items():
            by_name[f"{path}.{name}"].set_value(place(f"{path}.{name}", np.asarray(value)))
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
        raise ModelError(f"unknown task {name!r}; use one of {', '.join(heads.TASKS)}")
    if name not in heads.CLASSIFICATION:
        if num_labels is not None or id2label is not None:
            raise ModelError(f"num_labels / id2label apply to classification tasks, not {name!r}")
        return heads.Task(name)
    has_head = name == saved and not new_head
    if num_labels is None and id2label is None:
        labels = heads.labels_from(hf_config=hf_config)
    else:
        labels = heads.labels_from(num_labels, id2label)
        saved_labels = heads.labels_from(hf_config=hf_config)
        if has_head and len(labels) != len(saved_labels):
            raise ModelError(
                f"{where}: the checkpoint's {name} head has {len(saved_labels)} labels {list(saved_labels)}, "
                f"but {len(labels)} were asked for; omit num_labels/id2label to use the checkpoint's head, "
                "or pass new_head=True to replace it with a freshly initialised one"
            )
    problem_type = (
        problem_type or getattr(hf_config, "problem_type", None) or heads.default_problem_type(labels)
    )
    return heads.Task(name, heads.Labels(labels, problem_type))


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
    mesh=None,
    rules=(),
    lora=None,
):
    """Load a pretrained model from a Hugging Face directory, a hub id or a GGUF file.

    The family comes from config.json's ``model_type``; weights map through the family's one table.
    ``task`` is ``causal_lm``, ``sequence_classification``, ``token_classification`` or ``base``; by
    default the one config.json's ``architectures`` names. A checkpoint with the task's head loads it
    (``num_labels`` must then match it, unless ``new_head=True`` asks for a fresh one); otherwise the head
    is initialised from ``seed`` as transformers would, with ``num_labels`` / ``id2label`` labels and
    ``problem_type`` (single_label_classification, multi_label_classification or regression).
    With a ``mesh``, parameters are loaded straight into their shards (``rules``: logical axis name ->
    mesh axes, as in config.mesh.rules). ``lora``: a :class:`jaxtune.models.lora.LoraSpec`, adapters
    beside the layers it targets (starting at zero: the model computes what the checkpoint does).

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
    try:
        cfg = fam.config_from_hf(hf_config)
        spec = resolve_task(hf_config, fam, local, task, num_labels, id2label, problem_type, new_head)
        return _build(fam, cfg, spec, tensors, dtype, seed, new_head, mesh, rules, lora)
    except ModelError as e:
        if local in str(e):
            raise
        raise ModelError(f"{local}: {e}") from e


BYTES = "bytes"


def byte_tokenizer():
    """A tokenizer with one id per byte (0-255) and ``<|endoftext|>`` (256) as EOS and padding: enough
    for models trained from scratch in tests and smoke runs, and exportable like any other."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps bytes to printable characters in byte order; number them 0-255 in that order.
    byte_chars = sorted(alphabet, key=lambda ch: _BYTE_OF[ch])
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(byte_chars)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>"
    tok.add_special_tokens([eos])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos)


def _byte_chars() -> dict:
    # GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves, the rest to
    # 256 + n in byte order.
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _byte_chars()


def load_tokenizer(path):
    """The tokenizer of a model directory, hub id or GGUF file (transformers' fast tokenizer), or
    jaxtune's byte tokenizer for ``"bytes"``."""
    if path == BYTES:
        return byte_tokenizer()
    local = resolve(path)
    if local.endswith(".gguf"):
        from jaxtune import gguf

        return gguf.tokenizer(local)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(local, trust_remote_code=False)
    except (ValueError, OSError, TypeError, KeyError, UnicodeDecodeError) as e:
        if "trust_remote_code" in str(e) or "custom code" in str(e):
            # transformers' own advice (trust_remote_code=True) would run the directory's code.
            raise ModelError(
                f"{local}: its tokenizer is custom code, and jaxtune never runs code from a model directory; "
                "use a tokenizer with a tokenizer.json (model.tokenizer = PATH)"
            ) from e
        raise ModelError(f"{local}: the tokenizer cannot be loaded ({first_line(e)}); check its files") from e


def model_state(model) -> dict[str, np.ndarray]:
    """Parameters of a model as host numpy arrays keyed by dotted path."""
    params = by_path(nnx.state(model, nnx.Param))
    return {path: np.asarray(jax.device_get(v.get_value())) for path, v in params.items()}


def write_config(model, out_dir, dtype: str, tokenizer=None) -> None:
    """config.json (and the tokenizer's files): what transformers reads to rebuild the model, and what a
    training run keeps in ``workdir/model/`` to rebuild its model from a checkpoint.

    config.json names the task's transformers class in ``architectures`` and, for classifiers, carries
    ``id2label``, ``label2id`` and ``problem_type``."""
    cfg, task = model.cfg, model.task
    fam = family(cfg.model_type, "model")
    os.makedirs(out_dir, exist_ok=True)
    config = json.loads(cfg.hf_config_json)
    config.pop("torch_dtype", None)
    config["dtype"] = dtype
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
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


class OnHost:
    """One parameter on its way to the host, whole (``np.asarray``) or a layer at a time (``[i]``):
    gathered from every process when its shards span several (a pod), so an export holds one tensor
    at a time, never the model."""

    def __init__(self, value, dtype=None):
        self.value, self.dtype, self.shape = value, dtype, value.shape

    def _host(self, x) -> np.ndarray:
        if not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            x = multihost_utils.process_allgather(x, tiled=True)
        arr = np.asarray(jax.device_get(x))
        return arr.astype(self.dtype) if self.dtype is not None else arr

    def __getitem__(self, i) -> np.ndarray:
        return self._host(self.value[i])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        arr = self._host(self.value)
        return arr if dtype is None else arr.astype(dtype)


def save_pretrained(model, out_dir, tokenizer=None, dtype=None, max_shard_bytes=hf.MAX_SHARD_BYTES):
    """Write config.json + safetensors (sharded with an index above 5 GB) + tokenizer files, so that
    ``transformers.AutoModelFor<Task>.from_pretrained(out_dir)`` loads it with no missing keys.

    Tensor by tensor (a layer of a stacked parameter at a time), each shard written when it is full.
    On a pod every process calls it (the tensors are gathered collectively) and process 0 writes.
    A model with LoRA adapters is written merged (``W + scale * A B``), as a plain model."""
    if getattr(model, "lora", None) is not None:
        model = adapters.merged(model)
    cfg, task = model.cfg, model.task
    fam = family(cfg.model_type, "model")
    params = {path: v.get_value() for path, v in by_path(nnx.state(model, nnx.Param)).items()}
    cast = jnp.dtype(dtype) if dtype is not None else None
    saved = cast or next(iter(params.values())).dtype
    main = jax.process_index() == 0
    if main:
        write_config(model, out_dir, str(jnp.dtype(saved)), tokenizer)
    state = {path: OnHost(value, cast) for path, value in params.items()}
    hf.write_safetensors(out_dir, hf.state_to_hf(state, fam.hf_table(cfg, task)), max_shard_bytes, write=main)
    return out_dir


def model_from_config(
    hf_config,
    dtype=jnp.float32,
    *,
    task=None,
    num_labels=None,
    id2label=None,
    problem_type=None,
    seed=0,
    mesh=None,
    rules=(),
    lora=None,
):
    """A freshly initialised model (random weights, as transformers initialises them) for a transformers
    config object: training from scratch. With a ``mesh``, each parameter is created in its shards."""
    fam = family(hf_config.model_type, "config")
    cfg = fam.config_from_hf(hf_config)
    spec = resolve_task(
        hf_config, fam, "config", task, num_labels=num_labels, id2label=id2label, problem_type=problem_type
    )
    dtype = jnp.dtype(dtype)

    def create():
        return fam.MODEL(cfg, spec, rngs=nnx.Rngs(seed), dtype=dtype, lora=lora)

    graphdef, abstract = nnx.split(nnx.eval_shape(create))
    out = None if mesh is None else sharding.state_shardings(abstract, mesh, rules)
    state = jax.jit(lambda: nnx.to_pure_dict(nnx.state(create())), out_shardings=out)()
    return nnx.merge(graphdef, state)


def write_lora(spec, model_dir: str) -> None:
    """A run's adapters (``workdir/model/lora.json``), so its checkpoints can be rebuilt; none: removed."""
    where = os.path.join(model_dir, LORA_SPEC)
    if spec is None:
        if os.path.exists(where):
            os.remove(where)
        return
    with open(where, "w") as f:
        json.dump(dataclasses.asdict(spec), f, indent=2, sort_keys=True)


def read_lora(model_dir: str):
    """The :class:`LoraSpec` a run's ``model/`` directory records, or None."""
    where = os.path.join(model_dir, LORA_SPEC)
    if not fs.exists(where):
        return None
    try:
        return adapters.LoraSpec(**json.loads(fs.read_text(where)))
    except (ValueError, TypeError) as e:
        raise ModelError(
            f"{where}: not a LoRA record jaxtune wrote ({first_line(e)}); restore it from a copy"
        ) from e


def abstract_model(model_dir: str, dtype=jnp.float32):
    """The model a config.json describes (its task from ``architectures``, its LoRA adapters from
    ``lora.json``), with abstract parameters: shapes and dtypes only, to restore a checkpoint into."""
    hf_config = read_config(model_dir)
    fam = family(hf_config.model_type, model_dir)
    spec = resolve_task(hf_config, fam, model_dir)
    cfg = fam.config_from_hf(hf_config)
    lora = read_lora(model_dir)
    return nnx.eval_shape(lambda: fam.MODEL(cfg, spec, rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype), lora=lora))
