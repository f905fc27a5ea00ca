"""The device mesh, and the shardings of parameters, optimizer state and batches.

Parameters carry logical axis names from creation (``embed``, ``mlp``, ``heads``, ...; see
models/layers.py). A short rules table maps each name to mesh axes (``data``, ``fsdp``, ``tensor``);
:mod:`jaxtune.logical` turns names into PartitionSpecs (and holds the activation constraints).
"""

from __future__ import annotations

import logging
import math

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtune.config import MESH_AXES, mesh_shape
from jaxtune.errors import ConfigError
from jaxtune.logical import named

log = logging.getLogger(__name__)


def num_slices(devices) -> int:
    """How many TPU slices the devices span (joined over the data-center network); 1 elsewhere."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(config, devices=None) -> Mesh:
    """The ``(data, fsdp, tensor)`` mesh of ``config.mesh`` over all devices (one size may be -1),
    laid out along the physical topology: neighbouring mesh positions are neighbouring chips, so the
    inner axes' collectives stay on the fastest links. Across several slices, ``data`` is split
    between them (only its gradient all-reduce crosses the slower data-center network)."""
    devices = jax.devices() if devices is None else list(devices)
    sizes = mesh_shape(config, len(devices))
    shape = [sizes[a] for a in MESH_AXES]
    slices = num_slices(devices)
    if slices == 1:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    else:
        if sizes["data"] % slices:
            raise ConfigError(
                f"config key mesh.data = {sizes['data']}: the devices span {slices} slices, and only the "
                f"data axis crosses between them; make mesh.data a multiple of {slices}"
            )
        within = [sizes["data"] // slices, sizes["fsdp"], sizes["tensor"]]
        grid = mesh_utils.create_hybrid_device_mesh(
            within, [slices, 1, 1], devices, allow_split_physical_axes=True
        )
    return Mesh(grid, MESH_AXES)


def param_sharding(var, mesh: Mesh, rules) -> NamedSharding:
    """Sharding of one (abstract or concrete) parameter from its logical axis names."""
    names = var.get_metadata().get("out_sharding")
    if names is None:
        raise ValueError(
            f"parameter of shape {var.shape} has no logical axis names; create it with layers.param"
        )
    return named(names, var.shape, mesh, rules)


def state_shardings(state, mesh: Mesh, rules) -> dict:
    """Shardings for every variable of an nnx.State, as a nested dict shaped like ``nnx.to_pure_dict``."""
    out: dict = {}
    for path, var in nnx.to_flat_state(state):
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = param_sharding(var, mesh, rules)
    return out


def put(arr: np.ndarray, sharding) -> jax.Array:
    """A host array placed into its shards; each device (and, on a pod, each process) takes only its part."""
    return jax.make_array_from_callback(arr.shape, sharding, lambda index: arr[index])


def put_blocks(source, sharding) -> jax.Array:
    """A global array whose devices' blocks are read by ``source.read(index)`` (shape ``source.shape``):
    each process reads only what its devices hold, a block that several devices hold once."""
    read: dict = {}

    def block(index):
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in read:
            read[key] = source.read(index)
        return read[key]

    return jax.make_array_from_callback(source.shape, sharding, block)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Batch arrays (any rank): the leading dimension over the ``batch`` rule's axes (data x fsdp)."""
    return NamedSharding(mesh, PartitionSpec(dict(rules).get("batch")))


def batch_shards(shard: NamedSharding) -> int:
    """Into how many blocks ``shard`` (a :func:`batch_sharding`) cuts a batch's rows."""
    axes = shard.spec[0] if len(shard.spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(shard.mesh.shape[a] for a in axes)


def process_rows(shard: NamedSharding, batch_size: int) -> np.ndarray:
    """The rows of a global batch of ``batch_size`` that this process's devices hold, in order: the
    rows it loads and feeds (``jax.make_array_from_process_local_data``). On one process, all."""
    held = set()
    for index in shard.addressable_devices_indices_map((batch_size,)).values():
        held.update(range(batch_size)[index[0]])
    return np.asarray(sorted(held), np.int64)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def like_params(tree, params: dict, params_shardings: dict, mesh: Mesh):
    """Shardings for a tree that mirrors the parameters inside other structure (optimizer state): a leaf
    whose trailing dict keys name a parameter of the same shape takes that parameter's sharding; other
    leaves (counts, factored statistics) are replicated."""
    flat = jax.tree_util.tree_flatten_with_path
    shapes = {tuple(k.key for k in keys): leaf.shape for keys, leaf in flat(params)[0]}
    by_path = {tuple(k.key for k in keys): sh for keys, sh in flat(params_shardings)[0]}

    def pick(keys, leaf):
        names = []
        for k in reversed(keys):
            if not isinstance(k, jax.tree_util.DictKey):
                break
            names.insert(0, k.key)
        names = tuple(names)
        if names in by_path and shapes[names] == leaf.shape:
            return by_path[names]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, tree)
