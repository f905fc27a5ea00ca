"""LoRA: low-rank adapters beside the dense layers a regex picks, as PEFT defines them.

An adapted :class:`layers.Linear` computes ``x W + scale * (x A) B`` with A ``[in..., r]`` and B
``[r, out...]``; ``scale`` is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). A starts as PEFT's
(Kaiming-uniform: uniform in +-1/sqrt(fan_in)), B at zero, so an adapted model starts as its base. In
the stacked layers the adapters are stacked too, and they carry logical axis names: A's input side
and B's output side are named, and so sharded, like the base weight's; the rank stays replicated.

The adapters' values come from the spec's seed and each adapter's path, whoever creates them (a model
initialised in jit, a checkpoint's model loaded into its shards), so both get the same ones.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.errors import ModelError
from jaxtune.models import layers
from jaxtune.models.weights import Transform

A, B = "lora_a", "lora_b"
RANK = "lora_rank"  # the logical name of the rank dimension; no rule maps it: replicated


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """``rank`` r, ``alpha``, ``targets`` (a regex searched in the dotted paths of dense layers, such
    as ``layers.attn.q_proj``), ``rslora``, ``dropout`` (on an adapter's input in training) and the
    ``seed`` the A matrices are drawn from."""

    rank: int
    alpha: float
    targets: str
    rslora: bool = False
    dropout: float = 0.0
    seed: int = 0

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def is_adapter(path: str) -> bool:
    return path.endswith(f".{A}") or path.endswith(f".{B}")


def dense_layers(model) -> list[tuple[str, layers.Linear]]:
    """(dotted path, module) of every dense layer of a model."""
    out = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, layers.Linear):
            out.append((".".join(map(str, path)), node))
    return out


def targeted(model, spec: LoraSpec) -> list[tuple[str, layers.Linear]]:
    pattern = re.compile(spec.targets)
    return [(p, m) for p, m in dense_layers(model) if pattern.search(p)]


def initial(path: str, shape: tuple, dtype, fan_in: int, seed: int):
    """An adapter's first value: A as PEFT draws it (uniform in +-1/sqrt(fan_in)), B zero."""
    if path.endswith(B):
        return jnp.zeros(shape, dtype)
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()))
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def shapes(module: layers.Linear, rank: int) -> dict:
    """``{A: (shape, names, fan_in), B: ...}`` of the adapters of a dense layer (stacked or not)."""
    kernel = module.kernel
    names = tuple(kernel.get_metadata()["out_sharding"])
    lead = names.index("layers") + 1 if "layers" in names else 0
    shape = tuple(kernel.shape)
    n_in = module.n_in
    in_shape, out_shape = shape[lead : lead + n_in], shape[lead + n_in :]
    in_names, out_names = names[lead : lead + n_in], names[lead + n_in :]
    fan_in = math.prod(in_shape)
    return {
        A: (shape[:lead] + in_shape + (rank,), names[:lead] + in_names + (RANK,), fan_in),
        B: (shape[:lead] + (rank,) + out_shape, names[:lead] + (RANK,) + out_names, fan_in),
    }


def add(model, spec: LoraSpec) -> None:
    """Give every dense layer that ``spec.targets`` picks its adapter pair (in place)."""
    chosen = targeted(model, spec)
    if not chosen:
        paths = ", ".join(p for p, _ in dense_layers(model))
        raise ModelError(
            f"config key lora.targets = {spec.targets!r} matches no dense layer; the model has: {paths}"
        )
    for site, (path, module) in enumerate(chosen):
        for name, (_, names, value) in first_values(module, path, spec).items():
            setattr(module, name, nnx.Param(value, out_sharding=names, eager_sharding=False))
        module.lora_scale, module.lora_dropout, module.lora_site = spec.scale, spec.dropout, site


def first_values(module: layers.Linear, path: str, spec: LoraSpec) -> dict:
    """``{A: (shape, logical names, first value), B: ...}`` of a dense layer's adapters: what
    :func:`add` creates, and what a model loaded into its shards sets (see :func:`initial`)."""
    dtype = module.kernel.dtype
    return {
        name: (shape, names, initial(f"{path}.{name}", shape, dtype, fan_in, spec.seed))
        for name, (shape, names, fan_in) in shapes(module, spec.rank).items()
    }


def merged(model):
    """A copy of ``model`` with each adapter folded into its layer (``W + scale * A B``) and removed:
    the model PEFT's ``merge_and_unload`` gives, in the base model's own structure."""
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, state)
    for _, module in dense_layers(model):
        if not hasattr(module, A):
            continue
        w, a, b = module.kernel[...], module.lora_a[...], module.lora_b[...]
        delta = _product(a, b, a.ndim - module.n_in - 1)
        # Folded in the adapters' precision at least: a bfloat16 base (lora.base_dtype) comes out in
        # the adapters' float32, so the update is not rounded away.
        out = jnp.promote_types(w.dtype, a.dtype)
        module.kernel.set_value(w.astype(out) + module.lora_scale * delta.astype(out))
        for name in (A, B, "lora_scale", "lora_dropout", "lora_site"):
            delattr(module, name)
    model.lora = None
    return model


def _product(a, b, lead: int):
    """``A B`` (per layer when ``lead`` is 1): A ``[l, in..., r]``, B ``[l, r, out...]`` ->
    ``[l, in..., out...]``."""
    a2 = a.reshape(a.shape[:lead] + (-1, a.shape[-1]))
    b2 = b.reshape(b.shape[: lead + 1] + (-1,))
    out = jnp.einsum("...ir,...ro->...io", a2, b2)
    return out.reshape(a.shape[:-1] + b.shape[lead + 1 :])


def transforms(module: layers.Linear) -> dict:
    """How each adapter is stored in a PEFT file: A as torch's ``[r, in]`` Linear weight, B as
    ``[out, r]``, whatever layout the base weight has (GPT-2's Conv1D included)."""
    return {A: Transform(transpose=True, in_dims=module.n_in), B: Transform(transpose=True, in_dims=1)}
