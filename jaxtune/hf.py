"""Hugging Face checkpoint files <-> our flat parameter state, through a family's weight table.

Reading is lazy (safetensors are memory-mapped and each tensor is read when its parameter is built),
every checkpoint key must be consumed and every parameter filled, and a shape that disagrees with
config.json is an error naming the file and key.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Mapping

import numpy as np

from jaxtune import fs
from jaxtune.errors import ModelError, ModelNotFound, first_line

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
MAX_SHARD_BYTES = 5 * 1000**3

log = logging.getLogger(__name__)


class Tensors(Mapping):
    """Checkpoint key -> array, read on access; ``read(key, index)`` reads only a block (a tuple of
    slices), ``shape(key)`` reads none. ``readers``: key -> (file, read(key, index or None), shape(key))."""

    def __init__(self, readers: dict[str, tuple]):
        self._readers = readers

    def __getitem__(self, key):
        return self._readers[key][1](key, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self):
        return len(self._readers)

    def read(self, key: str, index: tuple) -> np.ndarray:
        return self._readers[key][1](key, index)

    def shape(self, key: str) -> tuple:
        return tuple(self._readers[key][2](key))

    def source(self, key: str) -> str:
        return self._readers[key][0]


def _safetensors_readers(path: str) -> dict:
    from safetensors import SafetensorError, safe_open

    def read(key, index, handle):
        try:
            # A block comes straight from the memory-mapped file: only its bytes are read.
            return handle.get_tensor(key) if index is None else handle.get_slice(key)[index]
        except SafetensorError as e:
            raise ModelError(f"{path}: tensor {key} cannot be read ({e}); download the file again") from e

    try:
        handle = safe_open(path, framework="np")
        keys = list(handle.keys())
    except SafetensorError as e:  # a truncated or corrupt file fails here, on its header
        raise ModelError(f"{path}: not a readable safetensors file ({e}); download the file again") from e
    return {
        key: (path, lambda k, i, h=handle: read(k, i, h), lambda k, h=handle: h.get_slice(k).get_shape())
        for key in keys
    }


def _torch_readers(path: str) -> dict:
    import pickle

    try:
        import torch
    except ImportError as e:
        raise ModelError(f"{path}: reading pytorch_model.bin needs torch; convert it to safetensors") from e
    # weights_only refuses pickled code: a .bin file cannot run anything on load.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's own message suggests weights_only=False, which would run the file's code: never that.
        raise ModelError(
            f"{path}: the pickle holds more than tensors, so it was not loaded (jaxtune never runs code "
            "from a model file); get this model as safetensors, or convert the file in a sandbox you trust"
        ) from e
    except (RuntimeError, EOFError) as e:  # truncated or not a torch file at all
        raise ModelError(f"{path}: not a readable PyTorch checkpoint ({first_line(e)})") from e

    def read(k, index, state=state):
        t = state[k] if index is None else state[k][index]
        return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()

    return {key: (path, read, lambda k, state=state: tuple(state[k].shape)) for key in state}


# transformers' order of preference in a model directory: a checkpoint found first is the one loaded,
# so a directory holding both a model.safetensors and an older index loads the same weights here.
WEIGHT_FILES = (
    (SAFETENSORS, False, _safetensors_readers),
    (SAFETENSORS_INDEX, True, _safetensors_readers),
    (TORCH_BIN, False, _torch_readers),
    (TORCH_BIN_INDEX, True, _torch_readers),
)


def read_safetensors(path: str) -> Tensors:
    """The tensors of one safetensors file, read on access."""
    return Tensors(_safetensors_readers(path))


def read_checkpoint(model_dir: str) -> Tensors:
    """All weight tensors of a Hugging Face model directory (single or sharded, safetensors or .bin)."""
    for name, indexed, reader in WEIGHT_FILES:
        path = os.path.join(model_dir, name)
        if not os.path.exists(path):
            continue
        if not indexed:
            return Tensors(reader(path))
        try:
            with open(path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ModelError(f"{path}: not a valid weight index ({e}); download it again") from e
        readers = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(model_dir, shard)
            if not os.path.exists(shard_path):
                raise ModelNotFound(
                    f"{path}: shard {shard} is listed but missing from {model_dir}; "
                    "download the complete checkpoint"
                )
            readers.update(reader(shard_path))
        return Tensors(readers)
    raise ModelNotFound(
        f"{model_dir}: no weights found; expected {SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN}"
    )


def stale_weight_files(out_dir: str) -> list[str]:
    """Weight files and indexes in ``out_dir`` that an export would leave beside its own."""
    if not fs.isdir(out_dir):
        return []
    names = {name for name, _, _ in WEIGHT_FILES}
    return sorted(
        n
        for n in fs.listdir(out_dir)
        if n in names or re.fullmatch(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)", n)
    )


def _compile(table) -> list:
    return [
        (re.compile(re.escape(template).replace(r"\{i\}", r"(\d+)")), template, path, tx)
        for template, path, tx in table
    ]


def _candidates(key: str, family, cfg) -> list[str]:
    """Names a checkpoint key may have in our table: as stored (after the family's legacy renames), and
    with the base-model prefix added, since a bare ``BertModel`` / ``LlamaModel`` saves its keys
    without ``bert.`` / ``model.``."""
    for old, new in getattr(family, "KEY_RENAMES", ()):
        key = re.sub(old, new, key)
    prefix = family.KEY_PREFIX[cfg.model_type]
    return [key] if key.startswith(prefix) else [key, prefix + key]


def state_from_hf(
    tensors: Tensors, family, cfg, table, shapes: dict[str, tuple], dtype, fresh=()
) -> Iterator[tuple[str, LazyParam]]:
    """Yield (our path, :class:`LazyParam`) for every parameter in ``shapes``, read from checkpoint
    tensors through ``table`` (the family's, for one task) when its blocks are asked for.

    Parameters under ``layers.`` carry a leading layer axis and are assembled from ``{i}`` keys.
    Parameters in ``fresh`` (a new task head) may be absent; the caller initialises them. Checkpoint
    tensors of another task's head (``family.HEAD_KEYS``) are dropped with a warning. Anything else
    left over or missing raises one error that lists it all.
    """
    num_layers = cfg.num_layers
    compiled = _compile(table)
    ignored = [re.compile(p) for p in family.IGNORED_KEYS]
    other_heads = [re.compile(p) for p in family.HEAD_KEYS]
    tied = set(family.TIED_KEYS) if getattr(cfg, "tie_embeddings", False) else set()
    sources: dict[str, dict] = {}  # our path -> {layer or None: (checkpoint key, transform)}
    unused, dropped = [], []
    for key in tensors:
        names = _candidates(key, family, cfg)
        if any(p.fullmatch(n) for p in ignored for n in names) or tied.intersection(names):
            continue
        found = False
        for regex, _, path, tx in compiled:
            m = next((m for m in map(regex.fullmatch, names) if m), None)
            if m and path in shapes:
                layer = int(m.group(1)) if m.groups() else None
                if layer is not None and layer >= num_layers:
                    break  # more layers in the checkpoint than config.json declares: reported as unused
                sources.setdefault(path, {})[layer] = (key, tx)
                found = True
                break
        if not found:
            (dropped if any(p.fullmatch(n) for p in other_heads for n in names) else unused).append(key)
    missing = []
    for path in shapes:
        got = sources.get(path, {})
        if not got and path in fresh:
            continue
        wanted = range(num_layers) if path.startswith("layers.") else [None]
        missing += [f"{path}[layer {i}]" if i is not None else path for i in wanted if i not in got]
    if missing or unused:
        raise ModelError(
            "checkpoint does not match config.json: "
            + (f"parameters with no checkpoint tensor: {', '.join(missing)}; " if missing else "")
            + (f"checkpoint tensors that map to no parameter: {', '.join(sorted(unused))}" if unused else "")
        )
    if dropped:
        log.warning("not used by this task's model (another head's weights): %s", ", ".join(sorted(dropped)))
    for path, shape in shapes.items():
        if path not in sources:
            continue
        per_layer = sources[path]
        inner = shape[1:] if path.startswith("layers.") else shape
        for key, tx in per_layer.values():
            got = tensors.shape(key)
            if got != tx.hf_shape(inner):
                raise ModelError(
                    f"{tensors.source(key)}: tensor {key} has shape {tuple(got)}, but config.json implies "
                    f"{tx.hf_shape(inner)}; the weights and config.json belong to different models"
                )
        yield path, LazyParam(tensors, shape, dtype, per_layer, path.startswith("layers."))


def _block(shape: tuple, index) -> tuple:
    """``index`` (what ``jax.make_array_from_callback`` asks for, or None: all) as concrete slices."""
    if index is None:
        return tuple(slice(0, d) for d in shape)
    out = []
    for sl, d in zip(index, shape, strict=True):
        start, stop, step = sl.indices(d)
        if step != 1:
            raise ValueError(f"strided block {index} of a parameter of shape {shape}")
        out.append(slice(start, stop))
    return tuple(out)


class LazyParam:
    """One parameter as its checkpoint tensors, not yet read: ``read(index)`` reads the block
    ``index`` only, from the layers it covers (a stacked ``[layers, ...]`` parameter is one checkpoint
    tensor per layer). A host loading its shards thus reads its share of the checkpoint, not all of it."""

    def __init__(self, tensors, shape: tuple, dtype, sources: dict, stacked: bool):
        self.tensors, self.shape, self.dtype = tensors, tuple(shape), np.dtype(dtype)
        self.sources, self.stacked = sources, stacked

    def _one(self, key: str, tx, shape: tuple, index: tuple) -> np.ndarray:
        return tx.read(lambda hf_index: self.tensors.read(key, hf_index), shape, index)

    def read(self, index=None) -> np.ndarray:
        index = _block(self.shape, index)
        if not self.stacked:
            key, tx = self.sources[None]
            return self._one(key, tx, self.shape, index).astype(self.dtype)
        layers = range(index[0].start, index[0].stop)
        parts = [self._one(*self.sources[i], self.shape[1:], index[1:]).astype(self.dtype) for i in layers]
        return np.stack(parts) if parts else np.zeros((0, *self.shape[1:]), self.dtype)


def state_to_hf(state: Mapping[str, np.ndarray], table) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (Hugging Face key, array) for every parameter through ``table``, unstacking the layer axis."""
    by_path = {path: (template, tx) for template, path, tx in table}
    for path, arr in state.items():
        if path not in by_path:
            raise KeyError(f"parameter {path} has no entry in the weight table")
        template, tx = by_path[path]
        if "{i}" in template:
            for i in range(arr.shape[0]):
                yield template.format(i=i), tx.to_hf(np.asarray(arr[i]))
        else:
            yield template, tx.to_hf(np.asarray(arr))


def write_safetensors(out_dir: str, tensors, max_shard_bytes=MAX_SHARD_BYTES, write: bool = True):
    """Write model.safetensors, or numbered shards plus an index when they exceed ``max_shard_bytes``.

    Tensors stream in: each shard is written (under a temporary name) as soon as it is full, so the
    host holds one shard at a time, never the model; the weights of an older model in ``out_dir``
    give way only once the new ones are complete, and a failed write leaves no temporary file.
    ``write=False`` (a pod's other processes) consumes the stream, whose arrays are gathered
    collectively, and writes nothing."""
    from safetensors.numpy import save_file

    # transformers checks this metadata to know the tensors are in PyTorch layout.
    meta = {"format": "pt"}
    written: list[tuple[str, list[str]]] = []  # (temporary file, its keys)
    shard: dict = {}
    size = total = 0

    def flush():
        tmp = os.path.join(out_dir, f".shard-{len(written) + 1}.safetensors.tmp")
        if write:
            save_file(shard, tmp, metadata=meta)
        written.append((tmp, list(shard)))

    try:
        for key, arr in tensors:
            arr = np.ascontiguousarray(arr)
            if size and size + arr.nbytes > max_shard_bytes:
                flush()
                shard, size = {}, 0
            shard[key] = arr
            size += arr.nbytes
            total += arr.nbytes
        flush()
    except BaseException:
        for tmp, _ in written if write else ():
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    if not write:
        return
    for name in stale_weight_files(out_dir):  # an older model's weights must not stay beside these
        os.remove(os.path.join(out_dir, name))
    if len(written) == 1:
        os.replace(written[0][0], os.path.join(out_dir, SAFETENSORS))
        return
    weight_map = {}
    for n, (tmp, keys) in enumerate(written, 1):
        name = f"model-{n:05d}-of-{len(written):05d}.safetensors"
        os.replace(tmp, os.path.join(out_dir, name))
        weight_map.update(dict.fromkeys(keys, name))
    with open(os.path.join(out_dir, SAFETENSORS_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
