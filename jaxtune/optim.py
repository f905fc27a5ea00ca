"""The Optax optimizer of a run: schedule, weight-decay mask, clipping and per-parameter learning rates.

Parameters are addressed by dotted paths (``layers.attn.q_proj.kernel``, ``embed``, ``score.kernel``).
Layers are stacked on a leading axis, so a per-layer learning rate is a vector over that axis.

Layer-wise decay (``lr_layer_decay = d`` with L layers): layer i (0 = closest to the input) trains at
``lr * d ** (L - i)``, the embeddings one step further at ``lr * d ** (L + 1)``, and what sits above the
layers (final norm, LM head, classification head) at ``lr``. Regex multipliers then scale what they
match (the first matching pattern wins). Frozen parameters are not in the optimizer at all.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

EMBEDDINGS = ("embed", "pos_embed", "type_embed", "embed_norm")


def dotted(keys) -> str:
    """``layers.attn.q_proj.kernel`` for a jax key path (dict keys, attribute names, indices)."""
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keys)


def paths(tree) -> list[str]:
    """Dotted paths of a tree's leaves, in ``jax.tree`` order."""
    return [dotted(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def map_paths(fn, tree):
    """``fn(path, leaf)`` over a nested dict of arrays, keeping its structure."""
    return jax.tree_util.tree_map_with_path(lambda kp, x: fn(dotted(kp), x), tree)


def split(tree: dict, take) -> tuple[dict, dict]:
    """Two nested dicts: the leaves whose path satisfies ``take``, and the rest."""
    yes, no = {}, {}
    for key, value in tree.items():
        if isinstance(value, dict):
            a, b = split(value, lambda p, key=key: take(f"{key}.{p}"))
            if a:
                yes[key] = a
            if b:
                no[key] = b
        else:
            (yes if take(str(key)) else no)[key] = value
    return yes, no


def merge(a: dict, b: dict) -> dict:
    """The union of two nested dicts with disjoint leaves."""
    out = dict(a)
    for key, value in b.items():
        out[key] = merge(out[key], value) if key in out else value
    return out


def frozen_matcher(patterns):
    compiled = [re.compile(p) for p in patterns]
    return lambda path: any(p.search(path) for p in compiled)


def schedule(c, total_steps: int):
    """Learning rate by step: ``c.warmup_steps`` (or ``c.warmup_ratio`` of the run) of linear warmup from
    0, then ``c.schedule``. Warmup then linear decay is Hugging Face's ``get_linear_schedule_with_warmup``
    step for step."""
    lr, warmup = c.lr, c.warmup_steps or int(math.ceil(c.warmup_ratio * total_steps))
    rest = max(total_steps - warmup, 1)
    end = lr * c.min_lr_ratio
    if c.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif c.schedule == "linear":
        main = optax.linear_schedule(lr, end, rest)
    elif c.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, rest, alpha=c.min_lr_ratio)
    elif c.schedule == "wsd":  # warmup, stable, then a linear decay over the last decay_fraction
        decay = max(int(round(rest * c.decay_fraction)), 1)
        main = optax.join_schedules(
            [optax.constant_schedule(lr), optax.linear_schedule(lr, end, decay)], [rest - decay]
        )
    elif c.schedule == "inverse_sqrt":  # continuous with the warmup: lr at its end, then lr * sqrt(w / t)
        w = max(warmup, 1)
        main = lambda count: lr * jnp.sqrt(w / jnp.maximum(count + w, 1))  # noqa: E731
    else:
        raise ValueError(f"unknown schedule {c.schedule!r}")
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def decay_mask(params: dict):
    """Weight decay on weights, not on biases or norm scales (as Hugging Face's Trainer does)."""

    def decayed(path, _):
        parts = path.split(".")
        return parts[-1] != "bias" and not (len(parts) > 1 and "norm" in parts[-2])

    return map_paths(decayed, params)


def lr_multipliers(params: dict, c, num_layers: int):
    """Per-parameter learning-rate multipliers (scalars, or vectors over the stacked layer axis), or
    None when every multiplier is 1."""
    d = c.lr_layer_decay
    rules = [(re.compile(p), float(m)) for p, m in c.lr_multipliers]
    any_scale = d != 1.0 or bool(rules)

    def one(path, x):
        top = path.split(".")[0]
        if top == "layers":
            per_layer = d ** (num_layers - np.arange(num_layers, dtype=np.float64))
            m = per_layer.reshape((num_layers,) + (1,) * (x.ndim - 1))
        elif top in EMBEDDINGS:
            m = np.asarray(d ** (num_layers + 1))
        else:
            m = np.asarray(1.0)
        for regex, scale in rules:
            if regex.search(path):
                m = m * scale
                break
        return jnp.asarray(m, jnp.float32)

    return map_paths(one, params) if any_scale else None


def scale_by_tree(multipliers) -> optax.GradientTransformation:
    """Multiply each update by its multiplier (broadcast over the parameter's shape)."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, multipliers), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make(c, params: dict, total_steps: int, num_layers: int):
    """(optimizer, schedule) for the trainable ``params`` (a nested dict of arrays)."""
    lr = schedule(c, total_steps)
    mask = decay_mask(params)
    wd = c.weight_decay
    if c.name == "adamw":
        opt = optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=wd, mask=mask)
    elif c.name == "adafactor":
        opt = optax.adafactor(lr, weight_decay_rate=wd or None, weight_decay_mask=mask)
    elif c.name == "lion":
        opt = optax.lion(lr, b1=c.b1, b2=c.b2, weight_decay=wd, mask=mask)
    elif c.name == "sgd":
        sgd = optax.sgd(lr, momentum=c.momentum or None, nesterov=c.nesterov)
        opt = optax.chain(optax.add_decayed_weights(wd, mask), sgd) if wd else sgd
    else:
        raise ValueError(f"unknown optimizer {c.name!r}")
    parts = [optax.clip_by_global_norm(c.clip_norm)] if c.clip_norm else []
    parts.append(opt)
    multipliers = lr_multipliers(params, c, num_layers)
    if multipliers is not None:
        parts.append(scale_by_tree(multipliers))
    return optax.chain(*parts), lr
