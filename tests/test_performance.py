"""Performance seams that must not change a result: the hand-written backward passes (dense products,
MLP activations, norms, attention, the chunked loss) equal autodiff's, FSDP divides a full fine-tune's
parameters and optimizer state by the devices, and MFU counts FLOPs and peaks as documented."""

import functools
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from runs import tiny_config

from jaxtune import mfu, sharding
from jaxtune.models import layers, ops
from jaxtune.plan import plan

SMOKE = os.path.join(os.path.dirname(__file__), "..", "configs", "smoke.py")


@pytest.mark.parametrize(
    "x_shape, w_shape, n_in",
    [((2, 3, 4), (4, 5), 1), ((2, 3, 4, 6), (4, 6, 7), 2), ((6, 5), (5, 3, 4), 1), ((5,), (5, 2), 1)],
)
@pytest.mark.parametrize(
    "dtype, out_dtype", [(jnp.float32, None), (jnp.bfloat16, None), (jnp.bfloat16, jnp.float32)]
)
@pytest.mark.e2e
def test_dense_gradients_equal_autodiff(x_shape, w_shape, n_in, dtype, out_dtype):
    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, x_shape, jnp.float32).astype(dtype)
    w = jax.random.normal(kw, w_shape, jnp.float32).astype(dtype)
    out_shape = x_shape[: len(x_shape) - n_in] + w_shape[n_in:]
    cot = jax.random.normal(kc, out_shape, jnp.float32)
    contract = (tuple(range(len(x_shape) - n_in, len(x_shape))), tuple(range(n_in)))

    def ours(x, w):
        return jnp.sum(ops.dense(x, w, n_in, out_dtype).astype(jnp.float32) * cot)

    def autodiff(x, w):
        # ops.dense's forward: few 16-bit rows (all of these) accumulate in float32, rounded once.
        acc = jnp.float32 if dtype == jnp.bfloat16 and out_dtype is None else out_dtype
        y = jax.lax.dot_general(x, w, (contract, ((), ())), preferred_element_type=acc)
        return jnp.sum(y.astype(out_dtype or dtype).astype(jnp.float32) * cot)

    value, grads = jax.jit(jax.value_and_grad(ours, (0, 1)))(x, w)
    want_value, want = jax.jit(jax.value_and_grad(autodiff, (0, 1)))(x, w)
    assert value == want_value
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for got, exp in zip(grads, want, strict=True):
        assert got.dtype == exp.dtype and got.shape == exp.shape
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(exp, np.float32), rtol=tol, atol=tol
        )


@pytest.mark.parametrize("rows, acc", [(8, "f32"), (ops.FEW_ROWS, "bf16")])
def test_a_16bit_product_of_few_rows_accumulates_in_float32(rows, acc):
    # A decode step's few rows take XLA CPU's fast float32-result kernels; training's many rows keep
    # the bfloat16 result, faster there (benchmarks/README.md).
    kx, kw = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (rows, 64), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (64, 48), jnp.float32).astype(jnp.bfloat16)
    hlo = jax.jit(lambda x, w: ops.dense(x, w, 1)).lower(x, w).as_text()
    assert f"-> tensor<{rows}x48x{acc}>" in hlo, hlo
    got = ops.dense(x, w, 1)
    want = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=1e-2, atol=1e-2)


@pytest.mark.e2e
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


def _autodiff_attention(q_btnh, k_bskh, v_bskh, mask_bts, scale):
    """The reference's math through autodiff (no hand-written backward, no causal blocks)."""
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2]
    q = q_btnh.reshape(b, t, k, n // k, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k_bskh, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask_bts[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bskh.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh).reshape(b, t, n, h)


@pytest.mark.parametrize(
    "t, causal, rows",
    [
        (512, True, "right"),  # two causal blocks of 256, right padding
        (512, True, "left"),  # fully masked query rows (left padding)
        (512, True, "packed"),  # segments: block-diagonal and causal
        (48, True, "right"),  # too short for blocks
        (40, False, "right"),  # an encoder's mask: every token sees the row
    ],
)
@pytest.mark.e2e
def test_attention_equals_autodiff_of_the_reference(t, causal, rows):
    b, n, k, h = 2, 6, 2, 16
    kq, kk, kv, kd = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(kq, (b, t, n, h))
    keys, values = jax.random.normal(kk, (b, t, k, h)), jax.random.normal(kv, (b, t, k, h))
    d_out = jax.random.normal(kd, (b, t, n, h))
    mask, segments = np.ones((b, t), np.int32), None
    if rows == "right":
        mask[1, t - 7 :] = 0
    elif rows == "left":
        mask[1, :9] = 0
    else:
        segments = np.zeros((b, t), np.int32)
        segments[:, t // 3 :] = 1
        segments[:, t // 2 :] = 2
    mask_bts = layers.attention_mask_bts(jnp.asarray(mask), segments, t, causal=causal)
    # A query row that sees no key at all (left padding) is padding: what it holds is not defined
    # (the causal blocks average a shorter row of masked keys), and nothing real reads it.
    seen = jnp.any(mask_bts, axis=-1)[:, :, None, None]
    d_out = jnp.where(seen, d_out, 0.0)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * d_out)

    def ours(q, k, v):
        return layers.attend(q, k, v, mask_bts, scale=0.25, causal=causal)

    def reference(q, k, v):
        return _autodiff_attention(q, k, v, mask_bts, 0.25)

    got = jax.jit(jax.value_and_grad(loss(ours), (0, 1, 2)))(q, keys, values)
    want = jax.jit(jax.value_and_grad(loss(reference), (0, 1, 2)))(q, keys, values)
    scale = float(jnp.sum(jnp.abs(reference(q, keys, values) * d_out)))  # the sum's terms cancel
    np.testing.assert_allclose(got[0], want[0], atol=1e-6 * scale)
    for a, e in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(e))))
    real = np.broadcast_to(np.asarray(seen), q.shape)
    np.testing.assert_allclose(
        np.asarray(ours(q, keys, values))[real], np.asarray(reference(q, keys, values))[real], atol=1e-5
    )
    assert (rows == "left") == (not real.all())


@pytest.mark.e2e
def test_a_rerun_loads_its_compiled_steps_from_the_compilation_cache(text_file, tmp_path):
    cache = tmp_path / "xla"

    def train(name):
        cmd = [sys.executable, "-m", "jaxtune.train", "--config", SMOKE, "--workdir", str(tmp_path / name)]
        cmd += [
            f"--config.data.train={text_file}",
            "--config.train.max_steps=2",
            "--config.eval.every_steps=0",
        ]
        cmd += [f"--config.train.compilation_cache_dir={cache}", "--config.checkpoint.every_steps=0"]
        # Every compile is kept here (by default only those of a second or more: the tiny model's
        # are faster than that).
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return {p.name for p in cache.iterdir()}

    first = train("first")
    assert len(first) >= 2  # the train step and the eval step at least
    assert train("second") == first  # nothing compiled again


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_bias_gradient_equals_autodiff(dtype):
    kx, kb, kc = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(kx, (3, 5, 8)).astype(dtype)
    b = jax.random.normal(kb, (8,)).astype(dtype)
    cot = jax.random.normal(kc, (3, 5, 8))
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    _values_and_gradients_agree(ops.add_features, lambda x, b: x + b, (x, b), (0, 1), cot, dtype, tol)


def _values_and_gradients_agree(ours, ref, args, argnums, cot, dtype, tol):
    """``ours(*args)`` and ``ref(*args)`` and their gradients (of the sum against ``cot``) at
    ``argnums`` are equal to ``tol``, in ``dtype``."""

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cot)

    got = (ours(*args), *jax.jit(jax.grad(loss(ours), argnums))(*args))
    want = (ref(*args), *jax.jit(jax.grad(loss(ref), argnums))(*args))
    for a, e in zip(got, want, strict=True):
        assert a.dtype == e.dtype == dtype and a.shape == e.shape
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), rtol=tol, atol=tol)


def _layer_norm_reference(x, w, b, eps):  # as BERT and GPT-2 compute it: float32, cast at the end
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(jnp.square(x32 - mean).mean(-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32) + b.astype(jnp.float32)).astype(x.dtype)


def _rms_norm_reference(x, w, eps):  # as Llama computes it: normalised in float32, cast, then scaled
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)).astype(x.dtype) * w


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_norms_equal_autodiff_of_their_formulas(kind, dtype):
    kx, kw, kb, kc = jax.random.split(jax.random.key(5), 4)
    x = (2 + 3 * jax.random.normal(kx, (3, 5, 16))).astype(dtype)  # an offset: the mean matters
    w = (1 + jax.random.normal(kw, (16,))).astype(dtype)
    b = jax.random.normal(kb, (16,)).astype(dtype)
    cot = jax.random.normal(kc, x.shape)
    eps = 1e-5
    ours, ref = {
        "layer": (
            lambda x, w, b: ops.layer_norm(x, w, b, eps),
            lambda x, w, b: _layer_norm_reference(x, w, b, eps),
        ),
        "rms": (lambda x, w, b: ops.rms_norm(x, w, eps), lambda x, w, b: _rms_norm_reference(x, w, eps)),
    }[kind]
    argnums = (0, 1, 2) if kind == "layer" else (0, 1)
    tol = 2e-5 if dtype == jnp.float32 else 2e-2
    _values_and_gradients_agree(ours, ref, (x, w, b), argnums, cot, dtype, tol)


AUTODIFF_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


@pytest.mark.parametrize("name", list(AUTODIFF_ACTIVATIONS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_activations_and_their_gated_form_equal_autodiff(name, dtype):
    kx, ku, kc = jax.random.split(jax.random.key(3), 3)
    x = (3 * jax.random.normal(kx, (4, 6, 16))).astype(dtype)  # tails where erf and tanh saturate
    u = jax.random.normal(ku, x.shape).astype(dtype)
    cot = jax.random.normal(kc, x.shape)
    ref = AUTODIFF_ACTIVATIONS[name]

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cot)

    got = (ops.activation(x, name), ops.gated(x, u, name))
    got += (jax.grad(loss(lambda x: ops.activation(x, name)))(x),)
    got += jax.grad(loss(lambda g, u: ops.gated(g, u, name)), (0, 1))(x, u)
    # The truth is autodiff's in float32 on the same inputs: in bfloat16, ours computes the slope in
    # float32 and rounds once, autodiff rounds at every step (and drifts further from it).
    x32, u32 = x.astype(jnp.float32), u.astype(jnp.float32)
    want = (ref(x32), ref(x32) * u32, jax.grad(loss(ref))(x32))
    want += jax.grad(loss(lambda g, u: ref(g) * u), (0, 1))(x32, u32)
    # float32: the erf and erfc forms of GELU differ in the last bits; bfloat16: one rounding.
    tol = 2e-6 if dtype == jnp.float32 else 1e-2
    for a, e in zip(got, want, strict=True):
        assert a.dtype == dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("name", ["gelu", "silu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_mlp_down_projection_equals_its_activation_then_its_product(gated, name, dtype):
    # mlp_down recomputes the hidden state in its backward pass instead of keeping it: the values and
    # gradients are those of the activation (or its gated form) and the product, taken in turn.
    ku, kg, kw, kc = jax.random.split(jax.random.key(4), 4)
    up = (3 * jax.random.normal(ku, (3, 5, 16))).astype(dtype)
    gate = (3 * jax.random.normal(kg, up.shape)).astype(dtype) if gated else None
    w = jax.random.normal(kw, (16, 8)).astype(dtype)
    cot = jax.random.normal(kc, (3, 5, 8))

    def in_turn(up, gate, w):
        h = ops.activation(up, name) if gate is None else ops.gated(gate, up, name)
        return ops.dense(h, w, 1)

    fused = functools.partial(ops.mlp_down, name=name)
    argnums = (0, 1, 2) if gated else (0, 2)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    _values_and_gradients_agree(fused, in_turn, (up, gate, w), argnums, cot, dtype, tol)


def test_attention_flops_count_the_keys_a_token_attends_to():
    shapes = dict(
        hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16, num_layers=3
    )
    decoder = types.SimpleNamespace(**shapes, gated_mlp=True, vocab_size=100, causal=True)
    encoder = types.SimpleNamespace(**shapes, gated_mlp=True, vocab_size=100, causal=False)
    per_key = 4 * 4 * 16 * 3 * 3  # q k^T and p v: 4 x heads x head_dim per key, 3 layers, x3 with backward
    for length in (128, 1024):
        assert mfu.flops_per_token(encoder, length) - mfu.flops_per_token(encoder, 0) == per_key * length
        # a causal token sees the keys up to itself: half the row on average
        assert mfu.flops_per_token(decoder, length) - mfu.flops_per_token(decoder, 0) == per_key * length / 2
    matmul_params = 3 * (64 * 16 * (2 * 4 + 2 * 2) + 64 * 128 * 3) + 64 * 100
    assert mfu.flops_per_token(decoder, 0) == 6 * matmul_params


def test_the_datasheet_peak_follows_the_compute_dtype():
    assert mfu.datasheet_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert mfu.datasheet_peak("NVIDIA H200", "float32") == 989e12 / 2  # TF32 under JAX's default precision
    assert mfu.datasheet_peak("TPU v5", "float32") == 459e12  # one bfloat16 pass
    assert mfu.datasheet_peak("TPU v5 lite", "bfloat16") == 197e12
    assert mfu.datasheet_peak("Some new chip", "bfloat16") == 0.0


def test_a_run_on_some_of_the_forced_host_devices_has_the_machines_peak():
    # They are slices of one CPU: a run on one of the 8 runs on every core (it once read 1/8 of the
    # machine, so a real step "beat" the peak at its first step).
    machine = mfu.measured_cpu_flops("float32")
    assert mfu.peak_flops(jax.devices()[:1]) == mfu.peak_flops(jax.devices()) == machine > 0
    assert mfu.peak_flops(jax.devices()[:2], override_tflops=2.0) == 4e12  # a given peak is per device


def test_the_measured_peak_is_the_best_this_machine_has_shown(tmp_path, monkeypatch):
    # One reading on a shared host can be low (it once was 40% low, and a step read 98% MFU).
    path = tmp_path / "cache" / "cpu_peak.json"
    monkeypatch.setattr(mfu, "PEAK_FILE", str(path))

    def measure(reading, dtype="float32"):
        monkeypatch.setattr(mfu, "_time_matmul", lambda dtype, n, repeats: reading)
        mfu.measured_cpu_flops.cache_clear()
        return mfu.measured_cpu_flops(dtype)

    def stored():
        return sorted(json.loads(path.read_text()).values())

    try:
        got = [measure(r) for r in (100e9, 50e9, 60e9, 200e9)] + [measure(30e9, "bfloat16")]
        assert got == [100e9, 100e9, 100e9, 200e9, 30e9]  # the best so far, per compute dtype
        assert stored() == [30e9, 200e9]  # a lower reading never replaced a higher one
        # A damaged file counts as empty, and the next reading replaces it.
        for damaged in ("{not json", "[1, 2]", json.dumps({k: "1e12" for k in json.loads(path.read_text())})):
            path.write_text(damaged)
            assert measure(70e9) == 70e9
            assert stored() == [70e9]
        path.write_text(json.dumps({k: float("inf") for k in json.loads(path.read_text())}))
        assert measure(80e9) == 80e9  # an infinite peak would read 0% MFU forever
        assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # no stray files
        # A cache that cannot be written (its folder is a file): the reading still counts.
        (tmp_path / "file").write_text("")
        monkeypatch.setattr(mfu, "PEAK_FILE", str(tmp_path / "file" / "cpu_peak.json"))
        assert measure(400e9) == 400e9
    finally:
        mfu.measured_cpu_flops.cache_clear()


@pytest.mark.e2e
@pytest.mark.parametrize("variant", ["llama", "llama-tied-mqa", "gemma2"])
def test_the_chunked_loss_and_its_gradients_equal_autodiff_of_the_whole_loss(variant, tmp_path):
    """losses.chunked_nll computes each chunk's gradients in its forward pass: the loss and the
    gradients of the hidden states and of the output weight (tied, separate, soft-capped) equal
    autodiff's over the whole logits, for one chunk and for several with padding; with the weight not
    differentiated (a frozen head), the same hidden-state gradient."""
    from hf_models import make_model

    import jaxtune
    from jaxtune import losses

    make_model(variant).save_pretrained(tmp_path / variant)
    model = jaxtune.load_pretrained(tmp_path / variant)
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(2, 9, model.cfg.hidden_size), jnp.float32)
    targets = jnp.asarray(rng.randint(0, model.cfg.vocab_size, (2, 9)), jnp.int32)
    mask = jnp.asarray(rng.rand(2, 9) > 0.3, jnp.float32)
    w, names = model.output_weights()

    def whole(w, x):
        logp = jax.nn.log_softmax(model.logits_with(w, x).astype(jnp.float32), axis=-1)
        return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * mask) / 7.0

    def chunked(chunk):
        def loss(w, x):
            n = 18 + (-18 % chunk)
            pad = lambda a: jnp.pad(a.reshape(18, *a.shape[2:]), [(0, n - 18)] + [(0, 0)] * (a.ndim - 2))
            split = lambda a: a.reshape(n // chunk, chunk, *a.shape[1:])
            args = (split(pad(x)), split(pad(targets)), split(pad(mask)))
            # divided, as the train step divides by its tokens: the backward pass must scale by it
            return losses.chunked_nll(model.logits_with, names, w, *args) / 7.0

        return loss

    want, (want_dw, want_dx) = jax.value_and_grad(whole, (0, 1))(w, x)
    for chunk in (18, 5):
        got, (dw, dx) = jax.jit(jax.value_and_grad(chunked(chunk), (0, 1)))(w, x)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        np.testing.assert_allclose(dx, want_dx, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(dw, want_dw, atol=1e-5, rtol=1e-5)
        frozen_dx = jax.jit(jax.grad(lambda x, c=chunk: chunked(c)(w, x)))(x)
        np.testing.assert_allclose(frozen_dx, want_dx, atol=1e-5, rtol=1e-5)
        assert float(jax.jit(chunked(chunk))(w, x)) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.e2e
def test_the_output_layer_skips_chunks_without_a_loss_and_the_loss_and_gradients_stay_the_same(tmp_path):
    """losses.causal_lm_loss puts the tokens with a loss first (within each group of rows) and skips
    the output layer for chunks with none: an SFT-like batch (losses on the answers at the rows' ends,
    one row without any) gives autodiff's loss and gradients over the whole logits, for one group of
    rows and for two, and only its labelled chunks' tokens go through the output layer."""
    from hf_models import make_model

    import jaxtune
    from jaxtune import losses

    make_model("llama").save_pretrained(tmp_path / "llama")
    model = jaxtune.load_pretrained(tmp_path / "llama")
    graphdef, params = nnx.split(model)
    rng = np.random.RandomState(0)
    b, t = 4, 16
    ids = jnp.asarray(rng.randint(0, model.cfg.vocab_size, (b, t)), jnp.int32)
    loss_mask = np.zeros((b, t), np.float32)
    loss_mask[0, 12:], loss_mask[1, 3:7], loss_mask[3, 10:15] = 1, 1, 1  # row 2 has no loss
    batch = {
        "input_ids": ids,
        "attention_mask": jnp.ones((b, t), jnp.int32),
        "targets": jnp.roll(ids, -1, axis=1),
        "loss_mask": jnp.asarray(loss_mask),
    }

    def whole(params):
        logits = nnx.merge(graphdef, params)(ids).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        return jnp.sum(nll * batch["loss_mask"])

    want, want_grads = jax.value_and_grad(whole)(params)
    for groups, chunk_tokens, computed in ((1, 8, 16), (2, 8, 16), (2, 64, 64), (1, 4, 16)):
        layout = losses.OutputOrder(batch["loss_mask"], chunk_tokens, groups)
        assert int(layout.computed_tokens()) == computed  # 13 tokens with a loss, 8 of them in rows 0-1
        used = losses.chunks_used(layout.chunks(batch["loss_mask"]))  # the chunks the loss loops over
        assert int(used) * layout.groups * layout.per == computed

        def ours(params, groups=groups, chunk_tokens=chunk_tokens):
            total, count = losses.causal_lm_loss(
                nnx.merge(graphdef, params), batch, chunk_tokens, groups=groups
            )
            return total, count

        (got, count), grads = jax.jit(jax.value_and_grad(ours, has_aux=True))(params)
        assert float(count) == 13.0
        np.testing.assert_allclose(got, want, rtol=1e-5)
        for a, e in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
            np.testing.assert_allclose(a, e, atol=1e-5, rtol=1e-4)
        assert float(jax.jit(ours)(params)[0]) == pytest.approx(float(want), rel=1e-5)
    nothing = dict(batch, loss_mask=jnp.zeros((b, t), jnp.float32))
    assert int(losses.OutputOrder(nothing["loss_mask"], 8).computed_tokens()) == 0
    total, count = losses.causal_lm_loss(model, nothing, 8)
    assert float(total) == 0.0 and float(count) == 0.0


def test_the_chunked_loss_gradients_stay_finite_in_float16():
    """A chunk's gradients are taken for the mean over the counted tokens, as the train step scales
    them: summed over 2048 tokens of one target, the output weight's row would overflow float16."""
    from jaxtune import losses

    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.rand(1, 2048, 8) * 100.0, jnp.float16)
    w = jnp.asarray(rng.randn(16, 8), jnp.float16)
    targets, mask = jnp.zeros((1, 2048), jnp.int32), jnp.ones((1, 2048), jnp.float32)

    def head(w, x):
        return jnp.einsum("btd,vd->btv", x, w.astype(x.dtype), preferred_element_type=jnp.float32)

    def mean(w, x, fn):
        return fn(w, x) / 2048.0

    def ours(w, x):
        return losses.chunked_nll(head, ("vocab", "embed"), w, x, targets, mask)

    def whole(w, x):
        logp = jax.nn.log_softmax(head(w, x)[0], axis=-1)
        return -jnp.sum(logp[:, 0])

    got = jax.jit(jax.grad(lambda w, x: mean(w, x, ours), (0, 1)))(w, x)
    want = jax.grad(lambda w, x: mean(w, x, whole), (0, 1))(w.astype(jnp.float32), x.astype(jnp.float32))
    for a, e in zip(got, want, strict=True):
        assert a.dtype == jnp.float16 and bool(jnp.all(jnp.isfinite(a)))
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e), rtol=2e-2, atol=2e-2)
