"""The device mesh, and the shardings of parameters, optimizer state and batches.

Parameters carry logical axis names from creation (``embed``, ``mlp``, ``heads``, ...; see
models/layers.py). A short rules table maps each name to mesh axes (``data``, ``fsdp``, ``tensor``);
:mod:`jaxtune.logical` turns names into PartitionSpecs (and holds the activation constraints).
"""

from __future__ import annotations

import logging

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtune.config import MESH_AXES, mesh_shape
from jaxtune.logical import named

log = logging.getLogger(__name__)


def make_mesh(config, devices=None) -> Mesh:
    """The ``(data, fsdp, tensor)`` mesh of ``config.mesh`` over all devices (one size may be -1)."""
    devices = jax.devices() if devices is None else devices
    sizes = mesh_shape(config, len(devices))
    grid = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
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


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Batch arrays (any rank): the leading dimension over the ``batch`` rule's axes (data x fsdp)."""
    return NamedSharding(mesh, PartitionSpec(dict(rules).get("batch")))


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
