"""Parity of every decoder family with transformers (PyTorch), and the export round trip."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_models import ATOL_EXPORT, ATOL_LOGITS, VARIANTS, batch, hf_logits, make_model

import jaxtune
from jaxtune.models import layers, ops


@pytest.mark.e2e
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers_and_export_round_trips(variant, tmp_path):
    ref = make_model(variant)
    ref.save_pretrained(tmp_path / "hf")
    ids, mask = batch(ref.config.vocab_size)
    want = hf_logits(ref, ids, mask)

    model = jaxtune.load_pretrained(str(tmp_path / "hf"))
    got = np.asarray(model(ids, attention_mask=mask))
    assert got.shape == want.shape
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=ATOL_LOGITS, rtol=0)

    jaxtune.save_pretrained(model, tmp_path / "export")
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "export", output_loading_info=True, dtype=torch.float32
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(back) is type(ref)
    np.testing.assert_allclose(hf_logits(back.eval(), ids, mask)[real], want[real], atol=ATOL_EXPORT, rtol=0)


def test_left_padding_does_not_change_logits(tmp_path):
    ref = make_model("llama")
    ref.save_pretrained(tmp_path)
    model = jaxtune.load_pretrained(str(tmp_path))
    ids = np.random.RandomState(1).randint(0, 97, (1, 6))
    padded = np.concatenate([np.zeros((1, 3), int), ids], axis=1)
    mask = np.concatenate([np.zeros((1, 3), int), np.ones((1, 6), int)], axis=1)
    np.testing.assert_allclose(np.asarray(model(padded, mask))[:, 3:], np.asarray(model(ids)), atol=1e-5)


def test_causal_future_tokens_do_not_leak(tmp_path):
    make_model("gemma2").save_pretrained(tmp_path)
    model = jaxtune.load_pretrained(str(tmp_path))
    ids = np.random.RandomState(2).randint(0, 97, (1, 10))
    changed = ids.copy()
    changed[0, 6:] = (changed[0, 6:] + 1) % 97
    a, b = np.asarray(model(ids)), np.asarray(model(changed))
    np.testing.assert_array_equal(a[:, :6], b[:, :6])
    assert np.abs(a[:, 6:] - b[:, 6:]).max() > 1e-3


@pytest.mark.e2e
@pytest.mark.parametrize("variant", ["llama", "gpt2", "gemma2"])
def test_packed_segments_do_not_attend_to_each_other(variant, tmp_path):
    make_model(variant).save_pretrained(tmp_path)
    model = jaxtune.load_pretrained(str(tmp_path))
    rng = np.random.RandomState(3)
    doc_a, doc_b = rng.randint(0, 97, (1, 4)), rng.randint(0, 97, (1, 7))
    packed = np.concatenate([doc_a, doc_b], axis=1)
    segments = np.array([[1] * 4 + [2] * 7])
    got = np.asarray(model(packed, segment_ids=segments))
    np.testing.assert_allclose(got[:, :4], np.asarray(model(doc_a)), atol=1e-5)
    np.testing.assert_allclose(got[:, 4:], np.asarray(model(doc_b)), atol=1e-5)
    explicit = np.array([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6]])
    np.testing.assert_allclose(
        np.asarray(model(packed, position_ids=explicit, segment_ids=segments)), got, atol=1e-6
    )


def test_every_parameter_has_logical_axis_names(tmp_path):
    from flax import nnx

    from jaxtune.models.layers import AXIS_NAMES

    make_model("gemma2").save_pretrained(tmp_path)
    model = jaxtune.load_pretrained(str(tmp_path))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.get_value().ndim, path
        assert set(names) <= set(AXIS_NAMES), (path, names)
        if path[0] == "layers":
            assert names[0] == "layers", path
    embed = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))[("embed",)]
    assert embed.get_metadata()["out_sharding"] == ("vocab", "embed")


def test_bfloat16_load_and_export_keep_dtype(tmp_path):
    ref = make_model("qwen2", dtype=torch.bfloat16)
    ref.save_pretrained(tmp_path / "hf")
    model = jaxtune.load_pretrained(str(tmp_path / "hf"), dtype=jnp.bfloat16)
    state = jaxtune.pretrained.model_state(model)
    assert {str(v.dtype) for v in state.values()} == {"bfloat16"}
    jaxtune.save_pretrained(model, tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["dtype"] == "bfloat16"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype="auto")
    sd_ref, sd_back = ref.state_dict(), back.state_dict()
    for key, value in sd_ref.items():
        assert sd_back[key].dtype == torch.bfloat16, key
        assert torch.equal(sd_back[key], value), key


def test_export_cli_casts_and_shards(tmp_path):
    from jaxtune import export, hf

    make_model("llama").save_pretrained(tmp_path / "hf")
    assert (
        export.main(["--model", str(tmp_path / "hf"), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"])
        == 0
    )
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert next(back.parameters()).dtype == torch.bfloat16

    model = jaxtune.load_pretrained(str(tmp_path / "hf"))
    jaxtune.save_pretrained(model, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded" / hf.SAFETENSORS_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "sharded", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    reloaded = jaxtune.load_pretrained(str(tmp_path / "sharded"))
    ids, mask = batch(97)
    np.testing.assert_array_equal(np.asarray(reloaded(ids, mask)), np.asarray(model(ids, mask)))


@pytest.mark.e2e
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_xla_attention_matches_transformers_too(variant, tmp_path):
    """The attention op chosen at call time (jax.nn.dot_product_attention; Gemma 2's soft-capping
    takes the reference): the same logits as transformers, and remat does not change a forward pass."""
    from jaxtune.models.layers import CallOptions

    ref = make_model(variant)
    ref.save_pretrained(tmp_path / "hf")
    ids, mask = batch(ref.config.vocab_size)
    want = hf_logits(ref, ids, mask)
    model = jaxtune.load_pretrained(str(tmp_path / "hf"))
    real = mask.astype(bool)
    for options in (CallOptions(attention="xla"), CallOptions(attention="xla", remat="dots")):
        got = np.asarray(model(ids, attention_mask=mask, options=options))
        np.testing.assert_allclose(got[real], want[real], atol=ATOL_LOGITS, rtol=0)


@pytest.mark.parametrize("name", sorted(layers._HF_ACTIVATIONS))
def test_every_activation_name_computes_what_transformers_computes(name):
    # transformers' own function for the name, on values from the far tails to the middle: a name mapped
    # to the wrong activation (or approximation) is off by far more than rounding.
    x = np.linspace(-9, 9, 2001, dtype=np.float32)
    want = transformers.activations.ACT2FN[name](torch.from_numpy(x)).numpy()
    got = np.asarray(ops.activation(jnp.asarray(x), layers.activation_name(name)))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
