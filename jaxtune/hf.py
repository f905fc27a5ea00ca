"""Hugging Face checkpoint files <-> our flat parameter state, through a family's weight table.

Reading is lazy (safetensors are memory-mapped and each tensor is read when its parameter is built),
every checkpoint key must be consumed and every parameter filled, and a shape that disagrees with
config.json is an error naming the file and key.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Mapping

import numpy as np

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
MAX_SHARD_BYTES = 5 * 1000**3


class Tensors(Mapping):
    """Checkpoint key -> array, read on access. ``source(key)`` names the file a key lives in."""

    def __init__(self, readers: dict[str, tuple[str, Callable[[str], np.ndarray]]]):
        self._readers = readers

    def __getitem__(self, key):
        return self._readers[key][1](key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self):
        return len(self._readers)

    def source(self, key: str) -> str:
        return self._readers[key][0]


def _safetensors_readers(path: str) -> dict:
    from safetensors import safe_open

    handle = safe_open(path, framework="np")
    return {key: (path, lambda k, h=handle: h.get_tensor(k)) for key in handle.keys()}


def _torch_readers(path: str) -> dict:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path}: reading pytorch_model.bin needs torch; convert it to safetensors") from e
    # weights_only refuses pickled code: a .bin file cannot run anything on load.
    state = torch.load(path, map_location="cpu", weights_only=True)

    def read(k, state=state):
        t = state[k]
        return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()

    return {key: (path, read) for key in state}


def read_checkpoint(model_dir: str) -> Tensors:
    """All weight tensors of a Hugging Face model directory (single or sharded, safetensors or .bin)."""
    for index_name, reader in ((SAFETENSORS_INDEX, _safetensors_readers), (TORCH_BIN_INDEX, _torch_readers)):
        index_path = os.path.join(model_dir, index_name)
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            readers = {}
            for shard in sorted(set(weight_map.values())):
                shard_path = os.path.join(model_dir, shard)
                if not os.path.exists(shard_path):
                    raise FileNotFoundError(
                        f"{index_path}: shard {shard} is listed but missing from {model_dir}; "
                        "download the complete checkpoint"
                    )
                readers.update(reader(shard_path))
            return Tensors(readers)
    for name, reader in ((SAFETENSORS, _safetensors_readers), (TORCH_BIN, _torch_readers)):
        path = os.path.join(model_dir, name)
        if os.path.exists(path):
            return Tensors(reader(path))
    raise FileNotFoundError(
        f"{model_dir}: no weights found; expected {SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN}"
    )


def _compile(table) -> list:
    return [
        (re.compile(re.escape(template).replace(r"\{i\}", r"(\d+)")), template, path, tx)
        for template, path, tx in table
    ]


def state_from_hf(
    tensors: Mapping, family, cfg, shapes: dict[str, tuple], dtype
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (our path, array) for every parameter in ``shapes``, built from checkpoint tensors.

    Parameters under ``layers.`` carry a leading layer axis and are assembled from ``{i}`` keys.
    Raises one error listing every unfilled parameter and every unused checkpoint key.
    """
    num_layers = cfg.num_layers
    table = _compile(family.hf_table(cfg))
    ignored = [re.compile(p) for p in family.IGNORED_KEYS]
    prefix = getattr(family, "KEY_PREFIX", "")
    tied = cfg.tie_embeddings and set(family.TIED_KEYS)
    sources: dict[str, dict] = {}  # our path -> {layer or None: (checkpoint key, transform)}
    unused = []
    for key in tensors:
        name = key
        if prefix and not name.startswith(prefix) and name not in family.TIED_KEYS:
            name = prefix + name
        if any(p.fullmatch(name) for p in ignored) or (tied and name in tied):
            continue
        for regex, _, path, tx in table:
            m = regex.fullmatch(name)
            if m and path in shapes:
                layer = int(m.group(1)) if m.groups() else None
                if layer is not None and layer >= num_layers:
                    unused.append(key)  # more layers in the checkpoint than config.json declares
                    break
                sources.setdefault(path, {})[layer] = (key, tx)
                break
        else:
            unused.append(key)
    missing = []
    for path in shapes:
        got = sources.get(path, {})
        wanted = range(num_layers) if path.startswith("layers.") else [None]
        missing += [f"{path}[layer {i}]" if i is not None else path for i in wanted if i not in got]
    if missing or unused:
        raise ValueError(
            "checkpoint does not match config.json: "
            + (f"parameters with no checkpoint tensor: {', '.join(missing)}; " if missing else "")
            + (f"checkpoint tensors that map to no parameter: {', '.join(sorted(unused))}" if unused else "")
        )
    for path, shape in shapes.items():
        per_layer = sources[path]
        inner = shape[1:] if path.startswith("layers.") else shape
        parts = []
        for layer in sorted(per_layer, key=lambda i: -1 if i is None else i):
            key, tx = per_layer[layer]
            arr = np.asarray(tensors[key])
            if arr.shape != tx.hf_shape(inner):
                src = tensors.source(key) if hasattr(tensors, "source") else "checkpoint"
                raise ValueError(
                    f"{src}: tensor {key} has shape {tuple(arr.shape)}, but config.json implies "
                    f"{tx.hf_shape(inner)}; the weights and config.json belong to different models"
                )
            parts.append(tx.to_ours(arr, inner).astype(dtype))
        yield path, (np.stack(parts) if path.startswith("layers.") else parts[0])


def state_to_hf(state: Mapping[str, np.ndarray], family, cfg) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (Hugging Face key, array) for every parameter, unstacking the layer axis."""
    by_path = {path: (template, tx) for template, path, tx in family.hf_table(cfg)}
    for path, arr in state.items():
        if path not in by_path:
            raise KeyError(f"parameter {path} has no entry in the {cfg.model_type} weight table")
        template, tx = by_path[path]
        if "{i}" in template:
            for i in range(arr.shape[0]):
                yield template.format(i=i), tx.to_hf(np.asarray(arr[i]))
        else:
            yield template, tx.to_hf(np.asarray(arr))


def write_safetensors(
    out_dir: str, tensors: Iterator[tuple[str, np.ndarray]], max_shard_bytes=MAX_SHARD_BYTES
):
    """Write model.safetensors, or numbered shards plus an index when they exceed ``max_shard_bytes``."""
    from safetensors.numpy import save_file

    shards: list[dict] = [{}]
    size = total = 0
    for key, arr in tensors:
        arr = np.ascontiguousarray(arr)
        if size and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = arr
        size += arr.nbytes
        total += arr.nbytes
    # transformers checks this metadata to know the tensors are in PyTorch layout.
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, SAFETENSORS), metadata=meta)
        return
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, name), metadata=meta)
        weight_map.update({key: name for key in shard})
    with open(os.path.join(out_dir, SAFETENSORS_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
