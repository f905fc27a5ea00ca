"""Dropout in training steps: the masks, and the sites (the same as transformers' BERT and GPT-2).
Training runs with dropout (reproducible, resumed exactly, eval untouched) are in test_train.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import ATOL_LOGITS, batch, make_model

import jaxtune
from jaxtune.models.layers import Dropout

SCALE = 0.7  # what the stand-in "dropout" multiplies by at every site, on both sides


def test_masks_drop_the_rate_scale_the_rest_and_follow_the_key():
    x = jnp.ones((400, 500))
    drop = Dropout(0.25, jax.random.key(3))
    y = np.asarray(drop(x, Dropout.MLP_OUT))
    assert abs((y == 0).mean() - 0.25) < 0.01
    np.testing.assert_allclose(y[y != 0], 1 / 0.75, rtol=1e-6)
    np.testing.assert_array_equal(y, np.asarray(drop(x, Dropout.MLP_OUT)))  # the same key, the same mask
    others = [drop(x, Dropout.ATTN_OUT), drop.layer(0)(x, Dropout.MLP_OUT), drop.layer(1)(x, Dropout.MLP_OUT)]
    for other in others:
        assert (np.asarray(other) != y).mean() > 0.3  # sites and layers draw their own masks


class _Scale(Dropout):
    """A deterministic stand-in for dropout: every site multiplies by SCALE, so that where a model
    applies dropout shows in its outputs."""

    def __init__(self):
        super().__init__(0.1, None)

    def layer(self, index):
        return self

    def __call__(self, x, site):
        return x * SCALE


def _scaled_torch_dropout(input, p=0.5, training=True, inplace=False):
    return input * SCALE if training and p > 0 else input


@pytest.mark.parametrize(
    "variant,task",
    [("bert", "sequence_classification"), ("bert", "token_classification"), ("gpt2", "causal_lm")],
)
def test_dropout_sites_are_transformers_sites(variant, task, tmp_path, monkeypatch):
    """With every dropout replaced by the same scaling on both sides, the training-mode outputs agree:
    jaxtune drops exactly where transformers does (embeddings, attention probabilities, attention and
    MLP outputs, classifier input)."""
    changes = {"num_labels": 3} if task != "causal_lm" else {}
    ref = make_model(variant, task=task, attn="eager", **changes)  # eager: attention dropout in torch
    ref.save_pretrained(tmp_path / "hf")
    model = jaxtune.load_pretrained(str(tmp_path / "hf"))
    ids, mask = batch(97, left=False)
    plain = np.asarray(model(ids, attention_mask=mask))
    got = np.asarray(model(ids, attention_mask=mask, dropout=_Scale()))

    kwargs = {"attention_mask": torch.tensor(mask)}
    if variant == "gpt2":
        kwargs["position_ids"] = torch.tensor(np.maximum(np.cumsum(mask, axis=1) - 1, 0))
    monkeypatch.setattr(torch.nn.functional, "dropout", _scaled_torch_dropout)
    ref.train()
    with torch.no_grad():
        want = ref(torch.tensor(ids), **kwargs).logits.numpy()
    rows = mask.astype(bool) if task != "sequence_classification" else np.ones(3, bool)
    assert np.abs(got[rows] - plain[rows]).max() > 100 * ATOL_LOGITS  # the sites do change the outputs
    np.testing.assert_allclose(got[rows], want[rows], atol=ATOL_LOGITS, rtol=0)
