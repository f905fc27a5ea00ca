"""Encoders (BERT, RoBERTa, DistilBERT) and task heads on every family: parity with transformers
(PyTorch), losses by problem_type, export round trips, and heads initialised for a base checkpoint."""

import logging

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_models import ATOL_EXPORT, ATOL_LOGITS, AUTO_CLASS, ENCODERS, make_model

import jaxtune
from jaxtune.losses import IGNORE_INDEX, classification_loss
from jaxtune.pretrained import model_state

SEQ, TOK = "sequence_classification", "token_classification"
PAD = {"bert": 0, "roberta": 1, "distilbert": 0}

ENCODER_CASES = [
    ("bert", SEQ, 3, None),
    ("bert", SEQ, 4, "multi_label_classification"),
    ("bert", SEQ, 1, None),  # one output: regression
    ("bert", TOK, 5, None),
    ("bert", "base", 0, None),
    ("roberta", SEQ, 3, None),
    ("roberta", SEQ, 2, "regression"),
    ("roberta", TOK, 5, None),
    ("roberta", "base", 0, None),
    ("distilbert", SEQ, 3, None),
    ("distilbert", SEQ, 4, "multi_label_classification"),
    ("distilbert", TOK, 5, None),
    ("distilbert", "base", 0, None),
]
DECODERS = ["llama", "llama-tied-mqa", "mistral-sliding", "qwen2", "qwen3", "gemma", "gemma2", "gpt2"]
DECODER_CASES = [(v, task, 3, None) for v in DECODERS for task in (SEQ, TOK)]


def inputs(variant, rng):
    """A padded batch: encoders right-padded with token types (BERT); decoders right- and left-padded.
    Padding holds the pad token, which real tokens never are (transformers finds padding through it)."""
    encoder = variant in ENCODERS
    pad = PAD.get(variant, 0)
    ids = rng.randint(0, 97, (3, 11))
    ids = np.where(ids == pad, pad + 1, ids)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 9:] = 0
    if not encoder:
        mask[2] = 1
        mask[2, :4] = 0
    ids = np.where(mask == 1, ids, pad)
    types = None
    if variant == "bert":  # a sentence pair: type 1 from the middle of each row on
        types = (np.arange(11)[None] >= np.array([[5], [3], [4]])).astype(int) * mask
    return ids, mask, types


def hf_forward(model, ids, mask, types=None, labels=None, decoder=False):
    kwargs = {"attention_mask": torch.tensor(mask)}
    if types is not None:
        kwargs["token_type_ids"] = torch.tensor(types)
    if decoder:  # jaxtune's default positions: left padding does not shift them
        kwargs["position_ids"] = torch.tensor(np.maximum(np.cumsum(mask, axis=1) - 1, 0))
    if labels is not None:
        kwargs["labels"] = torch.tensor(labels)
    with torch.no_grad():
        out = model(torch.tensor(ids), **kwargs)
    logits = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return logits.numpy(), (None if labels is None else float(out.loss))


def random_labels(task, problem_type, n, mask, rng):
    if problem_type == "regression":
        return rng.randn(3).astype(np.float32) if n == 1 else rng.randn(3, n).astype(np.float32)
    if problem_type == "multi_label_classification":
        return rng.randint(0, 2, (3, n)).astype(np.float32)
    if task == TOK:
        return np.where(mask == 1, rng.randint(0, n, mask.shape), IGNORE_INDEX)
    return rng.randint(0, n, 3)


@pytest.mark.parametrize(
    "variant,task,num_labels,problem_type",
    ENCODER_CASES + DECODER_CASES,
    ids=lambda x: str(x) if x is not None else "-",
)
@pytest.mark.e2e
def test_head_matches_transformers_and_export_round_trips(variant, task, num_labels, problem_type, tmp_path):
    decoder = variant not in ENCODERS
    changes = {}
    if task != "base":
        changes["id2label"] = {i: f"class_{i}" for i in range(num_labels)}
        if problem_type:
            changes["problem_type"] = problem_type
    if decoder:
        changes["pad_token_id"] = 0
    ref = make_model(variant, task=task, **changes)
    ref.save_pretrained(tmp_path / "hf")
    rng = np.random.RandomState(0)
    ids, mask, types = inputs(variant, rng)

    model = jaxtune.load_pretrained(str(tmp_path / "hf"))  # the task comes from config.json's architectures
    assert model.task.name == task
    got = np.asarray(model(ids, attention_mask=mask, token_type_ids=types))
    labels = None if task == "base" else random_labels(task, model.task.problem_type, num_labels, mask, rng)
    want, want_loss = hf_forward(ref, ids, mask, types, labels, decoder)
    assert got.shape == want.shape
    rows = np.ones(3, bool) if task == SEQ else mask.astype(bool)
    np.testing.assert_allclose(got[rows], want[rows], atol=ATOL_LOGITS, rtol=0)
    if labels is not None:
        total, count = classification_loss(got, labels, model.task.problem_type)
        np.testing.assert_allclose(float(total / count), want_loss, atol=ATOL_LOGITS, rtol=0)

    jaxtune.save_pretrained(model, tmp_path / "export")
    auto = getattr(transformers, AUTO_CLASS[task])
    back, info = auto.from_pretrained(tmp_path / "export", output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(back) is type(ref)
    if task != "base":
        assert back.config.id2label == ref.config.id2label
        assert back.config.label2id == {name: i for i, name in ref.config.id2label.items()}
        assert back.config.problem_type == model.task.problem_type
    np.testing.assert_allclose(
        hf_forward(back.eval(), ids, mask, types, None, decoder)[0][rows],
        want[rows],
        atol=ATOL_EXPORT,
        rtol=0,
    )


@pytest.mark.parametrize("variant", ["bert", "roberta", "distilbert", "llama", "gpt2"])
def test_base_checkpoint_gets_a_seeded_head_initialised_like_transformers(variant, tmp_path, caplog):
    encoder = variant in ENCODERS
    ref = make_model(variant, task="base" if encoder else "causal_lm", pad_token_id=PAD.get(variant, 0))
    ref.save_pretrained(tmp_path / "base")
    names = ["neg", "neu", "pos"]
    with caplog.at_level(logging.WARNING):
        model = jaxtune.load_pretrained(str(tmp_path / "base"), task=SEQ, id2label=names)
    assert "initialised from seed 0" in caplog.text
    if not encoder:  # the LM head is another task's: dropped, and said so
        assert "lm_head.weight" in caplog.text or ref.config.tie_word_embeddings
    assert model.task.labels == tuple(names)
    assert model.task.problem_type == "single_label_classification"

    state = model_state(model)
    base = model_state(jaxtune.load_pretrained(str(tmp_path / "base")))
    head = "score" if not encoder else "classifier"
    for path, value in base.items():  # the backbone is the checkpoint's
        if path in state and path.split(".")[0] not in ("pooler", "classifier", "score"):
            np.testing.assert_array_equal(state[path], value, err_msg=path)
    kernel = state[f"{head}.kernel"]
    assert kernel.shape == (32, 3)
    assert 0.5 * 0.02 < kernel.std() < 1.5 * 0.02  # normal(initializer_range), as transformers initialises
    if f"{head}.bias" in state:
        assert not state[f"{head}.bias"].any()
    again = model_state(jaxtune.load_pretrained(str(tmp_path / "base"), task=SEQ, id2label=names))
    np.testing.assert_array_equal(again[f"{head}.kernel"], kernel)
    other = model_state(jaxtune.load_pretrained(str(tmp_path / "base"), task=SEQ, id2label=names, seed=1))
    assert np.abs(other[f"{head}.kernel"] - kernel).max() > 1e-3

    ids, mask, types = inputs(variant, np.random.RandomState(1))
    jaxtune.save_pretrained(model, tmp_path / "export")
    back, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "export", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert back.config.id2label == dict(enumerate(names))
    want, _ = hf_forward(back.eval(), ids, mask, types, None, decoder=not encoder)
    np.testing.assert_allclose(np.asarray(model(ids, mask, types)), want, atol=ATOL_LOGITS, rtol=0)


def test_new_head_replaces_a_checkpoint_head_and_task_overrides_architectures(tmp_path, caplog):
    ref = make_model("bert", task=SEQ, num_labels=3)
    ref.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="head has 3 labels"):
        jaxtune.load_pretrained(str(tmp_path), num_labels=5)
    with caplog.at_level(logging.WARNING):
        model = jaxtune.load_pretrained(str(tmp_path), num_labels=5, new_head=True)
    assert "classifier.weight" in caplog.text and "initialised from seed 0" in caplog.text
    state = model_state(model)
    assert state["classifier.kernel"].shape == (32, 5)
    pooler = ref.bert.pooler.dense.weight.detach().numpy().T
    np.testing.assert_array_equal(state["pooler.kernel"], pooler)  # only the label layer is replaced

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        base = jaxtune.load_pretrained(str(tmp_path), task="base")
    assert "classifier.bias" in caplog.text
    ids, mask, types = inputs("bert", np.random.RandomState(2))
    with torch.no_grad():
        want = ref.bert(
            torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types)
        )
    real = mask.astype(bool)
    np.testing.assert_allclose(
        np.asarray(base(ids, mask, types))[real],
        want.last_hidden_state.numpy()[real],
        atol=ATOL_LOGITS,
        rtol=0,
    )


def test_tensorflow_era_layernorm_names_load(tmp_path):
    from safetensors.numpy import load_file, save_file

    ref = make_model("bert", task="base")
    ref.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    renamed = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in weights.items()
    }
    assert renamed.keys() != weights.keys()
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = jaxtune.load_pretrained(str(tmp_path))
    ids, mask, types = inputs("bert", np.random.RandomState(3))
    want, _ = hf_forward(ref, ids, mask, types)
    real = mask.astype(bool)
    np.testing.assert_allclose(
        np.asarray(model(ids, mask, types))[real], want[real], atol=ATOL_LOGITS, rtol=0
    )


def test_encoder_packed_segments_do_not_attend_to_each_other(tmp_path):
    make_model("roberta", task=TOK, num_labels=2).save_pretrained(tmp_path)
    model = jaxtune.load_pretrained(str(tmp_path))
    rng = np.random.RandomState(4)
    a, b = rng.randint(2, 97, (1, 4)), rng.randint(2, 97, (1, 6))
    got = np.asarray(model(np.concatenate([a, b], axis=1), segment_ids=np.array([[1] * 4 + [2] * 6])))
    np.testing.assert_allclose(got[:, :4], np.asarray(model(a)), atol=1e-5)
    np.testing.assert_allclose(got[:, 4:], np.asarray(model(b)), atol=1e-5)


@pytest.mark.parametrize("variant,task", [("bert", SEQ), ("distilbert", TOK), ("qwen2", SEQ)])
def test_every_head_parameter_has_logical_axis_names(variant, task, tmp_path):
    from jaxtune.models.layers import AXIS_NAMES

    make_model(variant, task=task, num_labels=3).save_pretrained(tmp_path)
    model = jaxtune.load_pretrained(str(tmp_path))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.get_value().ndim, path
        assert set(names) <= set(AXIS_NAMES), (path, names)
        assert len(set(names)) == len(names), (path, names)  # no two dims on one mesh axis
