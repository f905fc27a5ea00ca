"""Performance seams that must not change a result: the dense product's hand-written backward pass
equals autodiff's, and FSDP divides a full fine-tune's parameters and optimizer state by the devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from runs import tiny_config

from jaxtune import sharding
from jaxtune.models import layers
from jaxtune.plan import plan


@pytest.mark.parametrize(
    "x_shape, w_shape, n_in",
    [((2, 3, 4), (4, 5), 1), ((2, 3, 4, 6), (4, 6, 7), 2), ((6, 5), (5, 3, 4), 1), ((5,), (5, 2), 1)],
)
@pytest.mark.parametrize(
    "dtype, out_dtype", [(jnp.float32, None), (jnp.bfloat16, None), (jnp.bfloat16, jnp.float32)]
)
def test_dense_gradients_equal_autodiff(x_shape, w_shape, n_in, dtype, out_dtype):
    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, x_shape, jnp.float32).astype(dtype)
    w = jax.random.normal(kw, w_shape, jnp.float32).astype(dtype)
    out_shape = x_shape[: len(x_shape) - n_in] + w_shape[n_in:]
    cot = jax.random.normal(kc, out_shape, jnp.float32)
    contract = (tuple(range(len(x_shape) - n_in, len(x_shape))), tuple(range(n_in)))

    def ours(x, w):
        return jnp.sum(layers.dense(x, w, n_in, out_dtype).astype(jnp.float32) * cot)

    def autodiff(x, w):
        y = jax.lax.dot_general(x, w, (contract, ((), ())), preferred_element_type=out_dtype)
        return jnp.sum(y.astype(jnp.float32) * cot)

    value, grads = jax.jit(jax.value_and_grad(ours, (0, 1)))(x, w)
    want_value, want = jax.jit(jax.value_and_grad(autodiff, (0, 1)))(x, w)
    assert value == want_value
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for got, exp in zip(grads, want, strict=True):
        assert got.dtype == exp.dtype and got.shape == exp.shape
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(exp, np.float32), rtol=tol, atol=tol
        )


def test_fsdp_divides_parameters_and_optimizer_state_by_the_devices(text_file):
    """Per device, the compiled train step's arguments (parameters, Adam's two moments, the step and a
    batch sharded like the activations) shrink as 1/N under FSDP on 1, 2, 4 and 8 devices."""
    sizes = {}
    for n in (1, 2, 4, 8):
        config = tiny_config(text_file, **{"mesh.data": 1, "mesh.fsdp": n, "mesh.tensor": 1})
        p = plan(config, sharding.make_mesh(config, jax.devices()[:n]), total_steps=10)
        model = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(p.abstract["params"]))
        memory = p.lower(32).compile().memory_analysis()
        sizes[n] = memory.argument_size_in_bytes
    assert sizes[1] > 3 * model  # parameters, two moments, the batch
    for n in (2, 4, 8):
        # What stays whole on every device: the step counters (a few bytes each).
        assert sizes[1] / n <= sizes[n] <= sizes[1] / n + 1024, (n, sizes)
