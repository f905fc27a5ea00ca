"""cuDNN attention (model.attention = 'cudnn') against the reference einsums.

The mask recognition runs everywhere; the kernels need an NVIDIA GPU, so those tests skip without one
(CI has none). On a GPU machine: ``JAX_PLATFORMS= python -m pytest tests/test_gpu.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.models import layers

ON_GPU = jax.default_backend() == "gpu"
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="cuDNN attention needs an NVIDIA GPU (JAX sees none)")

T = 256


def _masks():
    """Causal masks [b=2, T, T] of each kind a batch can bring: (name, attention_mask, segment_ids,
    window)."""
    full = np.ones((2, T), np.int32)
    right = full.copy()
    right[0, 200:] = 0
    right[1, 37:] = 0
    left = full.copy()
    left[1, :50] = 0
    segments = np.repeat(np.arange(4), T // 4)[None].repeat(2, 0)
    return [
        ("full", full, None, 0, True),
        ("right_padded", right, None, 0, True),
        ("left_padded", left, None, 0, False),
        ("packed", full, segments, 0, False),
        ("window", full, None, 64, False),
    ]


NAMES = [mask[0] for mask in _masks()]


@pytest.mark.parametrize("name, attention_mask, segments, window, right", _masks(), ids=NAMES)
def test_a_causal_right_padded_mask_is_recognised_and_no_other(name, attention_mask, segments, window, right):
    mask = layers.attention_mask_bts(jnp.asarray(attention_mask), segments, T, jnp.asarray(window))
    lengths, right_padded = layers.causal_right_padding(mask)
    assert bool(right_padded) == right, name
    if right:
        np.testing.assert_array_equal(np.asarray(lengths), attention_mask.sum(-1))


@needs_gpu
@pytest.mark.parametrize("name, attention_mask, segments, window, right", _masks(), ids=NAMES)
def test_cudnn_attention_and_its_gradients_equal_the_reference(name, attention_mask, segments, window, right):
    del right
    rng = np.random.default_rng(0)
    b, n, k, h = 2, 8, 2, 64
    q, key, v, d_out = (
        jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
        for shape in ((b, T, n, h), (b, T, k, h), (b, T, k, h), (b, T, n, h))
    )
    mask = layers.attention_mask_bts(jnp.asarray(attention_mask), segments, T, jnp.asarray(window))
    seen = np.asarray(mask.any(-1))[:, :, None, None]  # query rows that see a key: the rest are noise

    def run(impl, dtype):
        def f(q, key, v):
            out = layers.attend(q, key, v, mask, scale=h**-0.5, impl=impl, causal=True)
            return jnp.sum(jnp.where(seen, out * d_out.astype(dtype), 0).astype(jnp.float32)), out

        args = (q.astype(dtype), key.astype(dtype), v.astype(dtype))
        (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(*args)
        return [np.asarray(x, np.float32) for x in (out, *grads)]

    got_all, want_all = run("cudnn", jnp.bfloat16), run("reference", jnp.float32)
    for got, want, what in zip(got_all, want_all, ("out", "dq", "dk", "dv"), strict=True):
        if what == "out":
            got, want = got * seen, want * seen
        error = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert np.isfinite(got).all() and error < 2e-2, f"{name} {what}: relative error {error:.2e}"
