"""Each bad input gives a one-line error naming the file or key and the way out."""

import json
import shutil
import time

import pytest
from hf_models import make_model

import jaxtune


@pytest.fixture
def hf_dir(tmp_path):
    make_model("llama").save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def edit_config(hf_dir, **changes):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(cfg))


def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(FileNotFoundError) as e:
        jaxtune.load_pretrained(str(tmp_path))
    assert "no config.json" in one_line(e) and str(tmp_path) in one_line(e)


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        jaxtune.load_pretrained(str(tmp_path / "nope"))
    assert "no such model directory" in one_line(e)


def test_unknown_architecture(hf_dir):
    edit_config(hf_dir, model_type="mamba9")
    with pytest.raises(ValueError) as e:
        jaxtune.load_pretrained(str(hf_dir))
    msg = one_line(e)
    assert "mamba9" in msg and "config.json" in msg and "llama" in msg


def test_unsupported_activation(hf_dir):
    edit_config(hf_dir, hidden_act="quick_gelu")
    with pytest.raises(jaxtune.errors.ModelError) as e:  # a JaxtuneError: the CLI prints it as one line
        jaxtune.load_pretrained(str(hf_dir))
    msg = one_line(e)
    assert "quick_gelu" in msg and "hidden_act" in msg and "silu" in msg


def test_missing_weights(hf_dir):
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as e:
        jaxtune.load_pretrained(str(hf_dir))
    assert "model.safetensors" in one_line(e)


def test_missing_shard(hf_dir, tmp_path):
    model = jaxtune.load_pretrained(str(hf_dir))
    out = tmp_path / "sharded"
    jaxtune.save_pretrained(model, out, max_shard_bytes=20_000)
    shard = sorted(out.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError) as e:
        jaxtune.load_pretrained(str(out))
    assert shard.name in one_line(e) and "index" in one_line(e)


def test_shape_mismatch_names_file_and_key(hf_dir):
    edit_config(hf_dir, intermediate_size=48)
    with pytest.raises(ValueError) as e:
        jaxtune.load_pretrained(str(hf_dir))
    msg = one_line(e)
    assert "model.safetensors: tensor model.layers.0.mlp." in msg and "64" in msg and "48" in msg


def test_missing_and_unexpected_keys_are_listed(hf_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(hf_dir / "model.safetensors")
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    tensors["model.layers.0.extra.weight"] = tensors["model.norm.weight"]
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        jaxtune.load_pretrained(str(hf_dir))
    msg = one_line(e)
    assert "layers.mlp.up_proj.kernel[layer 1]" in msg and "model.layers.0.extra.weight" in msg


def test_checkpoint_with_more_layers_than_config(hf_dir):
    edit_config(hf_dir, num_hidden_layers=2)
    with pytest.raises(ValueError) as e:
        jaxtune.load_pretrained(str(hf_dir))
    assert "map to no parameter" in one_line(e) and "model.layers.2.mlp.up_proj.weight" in one_line(e)


def test_hub_id_offline_fails_at_once(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    start = time.time()
    with pytest.raises(FileNotFoundError) as e:
        jaxtune.load_pretrained("some-org/some-model")
    assert time.time() - start < 10
    assert "offline" in one_line(e) and "some-org/some-model" in one_line(e)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not gguf at all")
    with pytest.raises(ValueError) as e:
        jaxtune.load_pretrained(str(bad))
    assert "model.gguf" in one_line(e)


def test_export_cli_reports_bad_input(tmp_path, capsys):
    from jaxtune import export

    assert export.main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "no such model directory" in capsys.readouterr().err


def test_pytorch_bin_checkpoint_loads(hf_dir, tmp_path):
    import numpy as np
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "bin"
    shutil.copytree(hf_dir, out)
    torch.save(load_file(out / "model.safetensors"), out / "pytorch_model.bin")
    (out / "model.safetensors").unlink()
    ids = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(
        np.asarray(jaxtune.load_pretrained(str(out))(ids)),
        np.asarray(jaxtune.load_pretrained(str(hf_dir))(ids)),
    )


@pytest.fixture
def classifier_dir(tmp_path):
    make_model("bert", task="sequence_classification", num_labels=3).save_pretrained(tmp_path / "c")
    return tmp_path / "c"


def test_num_labels_that_disagree_with_the_checkpoint_head(classifier_dir):
    with pytest.raises(ValueError) as e:
        jaxtune.load_pretrained(str(classifier_dir), num_labels=5)
    msg = one_line(e)
    assert str(classifier_dir) in msg and "3 labels" in msg and "5" in msg and "new_head=True" in msg


def test_unknown_task(classifier_dir):
    with pytest.raises(ValueError) as e:
        jaxtune.load_pretrained(str(classifier_dir), task="summarise")
    msg = one_line(e)
    assert "'summarise'" in msg and "sequence_classification" in msg


def test_head_that_the_architecture_does_not_have(classifier_dir, hf_dir):
    with pytest.raises(ValueError) as e:
        jaxtune.load_pretrained(str(classifier_dir), task="causal_lm")
    assert "bert is an encoder and has no causal_lm head" in one_line(e)
    with pytest.raises(ValueError) as e:
        jaxtune.load_pretrained(str(hf_dir), num_labels=3)  # a causal LM has no labels
    assert "classification tasks" in one_line(e) and "causal_lm" in one_line(e)


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(problem_type="ranking"), ["'ranking'", "regression"]),
        (dict(id2label={0: "a", 2: "b"}), ["0..1", "[0, 2]"]),
        (dict(id2label=["a", "a"]), ["repeated"]),
        (dict(num_labels=2, id2label=["a", "b", "c"]), ["num_labels=2", "3 labels"]),
        (dict(num_labels=0), ["at least 1"]),
    ],
)
def test_bad_label_arguments(hf_dir, kwargs, words):
    with pytest.raises(ValueError) as e:
        jaxtune.load_pretrained(str(hf_dir), task="sequence_classification", **kwargs)
    msg = one_line(e)
    assert all(w in msg for w in words), msg


def test_token_types_for_a_model_without_them(hf_dir, tmp_path):
    import numpy as np

    make_model("distilbert", task="base").save_pretrained(tmp_path / "d")
    for path in (hf_dir, tmp_path / "d"):
        model = jaxtune.load_pretrained(str(path))
        with pytest.raises(ValueError) as e:
            model(np.ones((1, 4), int), token_type_ids=np.zeros((1, 4), int))
        assert "has no token types" in one_line(e)
