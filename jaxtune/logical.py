"""Logical axis names -> shardings, and the activation constraints models apply while a step is traced.

Parameters and activations carry logical names (``embed``, ``mlp``, ``batch``, ...). A rules table maps
each name to mesh axes; :func:`spec` turns names into a PartitionSpec. A dimension that does not divide
by its mesh axes stays replicated (a vocabulary of 97 on 2 tensor shards, say), and is logged once.
This module imports nothing of jaxtune: models use :func:`constrain` and know nothing of training.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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
