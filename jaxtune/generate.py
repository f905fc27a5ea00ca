"""Greedy generation, enough to check a model end to end.

The prompt and the tokens to come share one fixed buffer, so the loop compiles once for a given
(batch, prompt length, max_new_tokens); each step re-runs the model over the buffer (no KV cache yet).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _greedy(graphdef, state, ids_bt, mask_bt, eos_ids, pad_id, max_new_tokens: int):
    model = nnx.merge(graphdef, state)
    b, t = ids_bt.shape
    ids_bt = jnp.concatenate([ids_bt, jnp.full((b, max_new_tokens), pad_id, ids_bt.dtype)], axis=1)
    mask_bt = jnp.concatenate([mask_bt, jnp.zeros((b, max_new_tokens), mask_bt.dtype)], axis=1)

    def step(i, carry):
        ids_bt, mask_bt, done_b = carry
        cur = t + i
        hidden = model.hidden_states(ids_bt, mask_bt)
        last = jax.lax.dynamic_slice_in_dim(hidden, cur - 1, 1, axis=1)
        nxt_b = jnp.argmax(model.logits(last)[:, 0].astype(jnp.float32), axis=-1).astype(ids_bt.dtype)
        nxt_b = jnp.where(done_b, pad_id, nxt_b)
        ids_bt = ids_bt.at[:, cur].set(nxt_b)
        mask_bt = mask_bt.at[:, cur].set(jnp.where(done_b, 0, 1).astype(mask_bt.dtype))
        return ids_bt, mask_bt, done_b | jnp.isin(nxt_b, eos_ids)

    ids_bt, mask_bt, _ = jax.lax.fori_loop(0, max_new_tokens, step, (ids_bt, mask_bt, jnp.zeros((b,), bool)))
    return ids_bt[:, t:], mask_bt[:, t:]


def generate_ids(model, input_ids, attention_mask=None, max_new_tokens=32, eos_token_id=None, pad_token_id=0):
    """Greedy continuation of (left-padded) ``input_ids``: a list of token-id lists, one per row,
    each ending at the first EOS (included) or after ``max_new_tokens``."""
    ids = np.asarray(input_ids, np.int32)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    eos = np.asarray([] if eos_token_id is None else np.atleast_1d(eos_token_id), np.int32)
    graphdef, state = nnx.split(model)
    new, valid = _greedy(graphdef, state, ids, mask, eos, pad_token_id, max_new_tokens)
    new, valid = np.asarray(new), np.asarray(valid).astype(bool)
    return [row[keep].tolist() for row, keep in zip(new, valid, strict=True)]


def generate(model, tokenizer, prompt_or_messages, max_new_tokens=32) -> str:
    """Greedy text continuation of a prompt string, or the assistant's answer to a list of chat
    messages (``[{"role": "user", "content": ...}]``, rendered with the tokenizer's chat template)."""
    if isinstance(prompt_or_messages, str):
        ids = tokenizer(prompt_or_messages)["input_ids"]
    else:
        ids = tokenizer.apply_chat_template(
            list(prompt_or_messages), add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    out = generate_ids(model, [ids], max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)[0]
    return tokenizer.decode(out, skip_special_tokens=True)
