"""The generation engine: a jitted prefill and a jitted decode step over a fixed-shape key/value cache.

A prompt batch is left-padded to a bucket (rows to a power of two, prompt length to a power of two of
at least 16), so a generation compiles its prefill once per (rows, prompt length, total length) and
its decode step once per (rows, total length): never per token. The decode step's state (the cache,
the slot mask, the last token, ...) is donated from one step to the next, so the cache is updated in
place. The host reads each step's tokens one step late, while the next step runs, to stream them and
to check stop strings without stalling the device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.errors import ConfigError
from jaxtune.logical import activation_sharding
from jaxtune.models import layers
from jaxtune.sampling import GREEDY, Sampler

MIN_PROMPT_BUCKET = 16
UNROLL_ROWS = 2  # see Engine


def bucket(n: int, minimum: int = 1) -> int:
    """The power of two at or above ``n`` (and ``minimum``)."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def _finish(gen, token_b, stop_ids, sampler):
    done_b = gen["done"] | jnp.isin(token_b, stop_ids)
    gen = dict(gen, token=token_b, done=done_b)
    if sampler.penalised:
        gen["seen"] = gen["seen"].at[jnp.arange(token_b.shape[0]), token_b].set(True)
    return gen, token_b, done_b


@dataclasses.dataclass(frozen=True)
class _Graph:
    """How the model's state is laid out for generation: whole (``layer_graph`` None: the stacked
    layers are scanned), or its layers apart as one state per layer (``layer_graph``: the layers'
    graph), run one after the other."""

    graphdef: object
    layer_graph: object = None

    def model(self, state):
        """(model, its layers as separate modules or None) inside jit."""
        if self.layer_graph is None:
            return nnx.merge(self.graphdef, state), None
        rest, per_layer = state
        # The stacked layers are never read on this path: shapes stand in for them.
        stacked = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((len(per_layer), *x.shape), x.dtype), per_layer[0]
        )
        model = nnx.merge(self.graphdef, stacked, rest)
        return model, [nnx.merge(self.layer_graph, layer["layers"]) for layer in per_layer]


@functools.partial(jax.jit, static_argnames=("graph", "sampler", "length"))
def _prefill(graph, state, ids_bt, mask_bt, live_b, stop_ids, key, *, sampler: Sampler, length: int):
    """The prompt through the model at cache slots 0 ... t-1, and the first new token."""
    model, blocks = graph.model(state)
    b, t = ids_bt.shape
    positions_bt = layers.default_positions(mask_bt, None, b, t)
    key_mask_bs = jnp.zeros((b, length), jnp.int32).at[:, :t].set(mask_bt)
    cache = model.empty_cache(b, length, model.embed[...].dtype)
    hidden_btd, cache = model.extend(ids_bt, positions_bt, cache, key_mask_bs, 0, blocks=blocks)
    logits_bv = model.logits(hidden_btd[:, -1:])[:, 0]  # left padding: every row's last token is at t-1
    gen = {
        "cache": cache,
        "key_mask": key_mask_bs,
        "position": jnp.sum(mask_bt, axis=1, dtype=jnp.int32),  # the next token's position
        "slot": jnp.asarray(t, jnp.int32),
        "done": ~live_b,
        "key": key,
        "step": jnp.zeros((), jnp.int32),
    }
    seen = None
    if sampler.penalised:
        seen = jnp.zeros(logits_bv.shape, bool).at[jnp.arange(b)[:, None], ids_bt].max(mask_bt > 0)
        gen["seen"] = seen
    token_b = sampler(logits_bv, jax.random.fold_in(key, 0), seen)
    return _finish(gen, token_b, stop_ids, sampler)


@functools.partial(jax.jit, static_argnames=("graph", "sampler"), donate_argnames=("gen",))
def _decode(graph, state, gen, stop_ids, pad_id, *, sampler: Sampler):
    """One new token per row: the last one goes into the cache at the next slot, its logits give the
    next. Rows already done emit ``pad_id`` and leave their slot masked."""
    model, blocks = graph.model(state)
    slot, live_b = gen["slot"], ~gen["done"]
    key_mask_bs = jax.lax.dynamic_update_slice_in_dim(
        gen["key_mask"], live_b.astype(jnp.int32)[:, None], slot, axis=1
    )
    hidden_btd, cache = model.extend(
        gen["token"][:, None], gen["position"][:, None], gen["cache"], key_mask_bs, slot, blocks=blocks
    )
    step = gen["step"] + 1
    token_b = sampler(model.logits(hidden_btd)[:, 0], jax.random.fold_in(gen["key"], step), gen.get("seen"))
    token_b = jnp.where(live_b, token_b, pad_id)
    gen = dict(
        gen,
        cache=cache,
        key_mask=key_mask_bs,
        position=gen["position"] + live_b.astype(jnp.int32),
        slot=slot + 1,
        step=step,
    )
    return _finish(gen, token_b, stop_ids, sampler)


class Engine:
    """Generation for one model: ``Engine(model).generate(prompts, ...)``. With a ``mesh`` (and its
    logical ``rules``), the cache is sharded like the activations of a training step; the model's
    parameters keep the shardings they have.

    ``unroll`` runs the layers one after the other from a copy of the weights held one array per layer,
    instead of scanning the stacked ones. XLA's CPU backend copies a scanned layer's weights out of the
    stack before using them, which makes a decode step of few rows (all weight reads) half again as
    slow; with more rows the scanned step is the faster one (SmolLM2-135M, 2 CPU cores: 30 against 46
    ms a step for one row, 76 against 65 for eight). The default, None, unrolls on CPU for up to
    :data:`UNROLL_ROWS` rows; accelerators read the slices in place, and a scan compiles in constant
    time.

    With 16-bit weights on CPU the engine unrolls at any number of rows (with ``unroll`` None; the
    scanned bfloat16 step was 3x slower at 8 rows) and runs at least 2 rows (a padded one): XLA's CPU
    kernel for a one-row bfloat16 product is 5x slower than for two (SmolLM2-135M, 2 CPU cores: a
    decode step of 365 against 103 ms).
    """

    def __init__(self, model, mesh=None, rules=(), unroll: bool | None = None):
        if getattr(model, "task", None) is None or model.task.name != "causal_lm":
            raise ConfigError("generation needs a causal language model (task causal_lm)")
        self.cfg, self.model = model.cfg, model
        self.mesh, self.rules, self.unroll = mesh, rules, unroll
        self._cpu = jax.default_backend() == "cpu"
        # 16-bit weights on CPU: unrolled and at least 2 rows (see the class).
        self._cpu_half = self._cpu and model.embed[...].dtype.itemsize < 4
        graphdef, state = nnx.split(model)
        self._layouts = {False: (_Graph(graphdef), state)}
        self.stats: dict = {}  # of the last generate(): prefill and decode seconds, steps, rows, batch

    def _layout(self, rows: int):
        """(graph, state) for a batch of ``rows``: scanned, or unrolled (see the class)."""
        unroll = self.unroll
        if unroll is None:
            unroll = self._cpu_half or (self._cpu and rows <= UNROLL_ROWS)
        if unroll not in self._layouts:
            graphdef, stacked, rest = nnx.split(self.model, nnx.PathContains("layers"), ...)
            per_layer = [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(self.cfg.num_layers)]
            self._layouts[True] = (_Graph(graphdef, nnx.graphdef(self.model.layers)), (rest, per_layer))
        return self._layouts[bool(unroll)]

    def _sharding(self):
        return contextlib.nullcontext() if self.mesh is None else activation_sharding(self.mesh, self.rules)

    def generate(
        self,
        prompts,
        max_new_tokens: int = 32,
        sampler: Sampler = GREEDY,
        seed: int = 0,
        stop_ids=(),
        pad_id: int = 0,
        on_token=None,
    ) -> list[list[int]]:
        """The new tokens of each prompt (a list of token ids): up to ``max_new_tokens``, ending with the
        first of ``stop_ids`` (kept) or where ``on_token(row, ids_so_far)`` returns True (stop strings,
        streaming: it sees each row's tokens as they come)."""
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts or min(map(len, prompts)) == 0:
            raise ConfigError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens = {max_new_tokens}: must be at least 1")
        longest = max(map(len, prompts))
        if self.cfg.position == "learned" and longest + max_new_tokens > self.cfg.max_positions:
            raise ConfigError(
                f"a prompt of {longest} tokens plus max_new_tokens {max_new_tokens} exceeds the model's "
                f"{self.cfg.max_positions} positions; shorten the prompt or ask for fewer new tokens"
            )
        n, t = len(prompts), bucket(longest, MIN_PROMPT_BUCKET)
        b = bucket(n, 2 if self._cpu_half else 1)
        ids, mask = np.full((b, t), pad_id, np.int32), np.zeros((b, t), np.int32)
        for row, p in enumerate(prompts):  # left padding: every row ends at the same slot
            ids[row, t - len(p) :], mask[row, t - len(p) :] = p, 1
        live = np.arange(b) < n
        stops = jnp.asarray(np.asarray(list(stop_ids), np.int32).reshape(-1))
        pad = jnp.asarray(pad_id, jnp.int32)
        rows, finished = [[] for _ in range(n)], [False] * n
        graph, state = self._layout(b)
        start = time.perf_counter()
        with self._sharding():
            gen, token, done = _prefill(
                graph,
                state,
                ids,
                mask,
                live,
                stops,
                jax.random.key(seed),
                sampler=sampler,
                length=t + max_new_tokens,
            )
            jax.block_until_ready(token)
            prefilled = time.perf_counter()
            steps = 0
            for i in range(max_new_tokens):
                upcoming = None
                if i + 1 < max_new_tokens:  # dispatched before this step's tokens are read
                    gen, *upcoming = _decode(graph, state, gen, stops, pad, sampler=sampler)
                    steps += 1
                token_b, done_b = jax.device_get((token, done))
                for row in range(n):
                    if finished[row]:
                        continue
                    rows[row].append(int(token_b[row]))
                    finished[row] = bool(done_b[row]) or bool(on_token and on_token(row, rows[row]))
                if all(finished) or upcoming is None:
                    break
                token, done = upcoming
            del gen
        self.stats = {
            "prefill_s": prefilled - start,
            "decode_s": time.perf_counter() - prefilled,
            "decode_steps": steps,
            "rows": n,
            "batch": b,  # the rows run: ``rows`` padded to a bucket
        }
        return rows
