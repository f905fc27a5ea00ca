"""The device mesh, and logical axis names -> shardings.

Parameters carry logical axis names from creation (``embed``, ``mlp``, ``heads``, ...; see
models/layers.py). A short rules table maps each name to mesh axes (``data``, ``fsdp``, ``tensor``);
:func:`spec` turns a parameter's names into a PartitionSpec. A dimension that does not divide by its
mesh axes stays replicated (a vocabulary of 97 on 2 tensor shards, say), and is logged once.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtune.config import MESH_AXES, mesh_shape

log = logging.getLogger(__name__)


# (mesh, rules) while a training step is traced; models constrain their activations with it.
_ACTIVE = contextvars.ContextVar("jaxtune_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules):
    """While tracing inside this block, :func:`constrain` pins activations to the rules' shardings."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x, names):
    """``x`` constrained to the sharding its logical ``names`` map to (``batch``, ``length``,
    ``act_embed``, ...); unchanged outside :func:`activation_sharding` (inference, tests). Without it
    the partitioner may pick an activation layout that mirrors the FSDP-sharded weights."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, named(names, x.shape, mesh, rules))


def make_mesh(config, devices=None) -> Mesh:
    """The ``(data, fsdp, tensor)`` mesh of ``config.mesh`` over all devices (one size may be -1)."""
    devices = jax.devices() if devices is None else devices
    sizes = mesh_shape(config, len(devices))
    grid = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def spec(names, shape, mesh: Mesh, rules) -> PartitionSpec:
    """PartitionSpec for a tensor with logical axis ``names``: each name's mesh axes, unless the axes
    are already used by an earlier dimension or do not divide the dimension."""
    table = dict(rules)
    used, out = set(), []
    for name, size in zip(names, shape, strict=True):
        axes = table.get(name)
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
        parts = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if axes and size % parts:
            log.info("dimension %s of size %d does not divide over %s; it stays replicated", name, size, axes)
            axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def named(names, shape, mesh: Mesh, rules) -> NamedSharding:
    return NamedSharding(mesh, spec(names, shape, mesh, rules))


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
