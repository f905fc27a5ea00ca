"""`python -m jaxtune.predict`: label names and probabilities from an exported classifier."""

import json

import jax
import numpy as np

import jaxtune
from jaxtune import assets, predict


def test_predict_from_an_export_with_label_names(tmp_path, capsys):
    model = jaxtune.load_pretrained(
        assets.minilm(), task="sequence_classification", id2label=["neg", "pos"], seed=1
    )
    tokenizer = jaxtune.load_tokenizer(assets.minilm())
    jaxtune.save_pretrained(model, tmp_path / "clf", tokenizer=tokenizer)
    texts = ["a gripping film", "flat and dull", "fine"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"sentence": t}) + "\n" for t in texts))
    args = [
        "--model",
        str(tmp_path / "clf"),
        "--input",
        str(tmp_path / "in.jsonl"),
        "--text-field",
        "sentence",
    ]
    assert predict.main([*args, "--output", str(tmp_path / "out.jsonl"), "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == texts
    enc = tokenizer(texts, padding=True, return_tensors="np")
    probs = np.asarray(jax.nn.softmax(model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])))
    for row, p in zip(rows, probs, strict=True):
        assert set(row["probabilities"]) == {"neg", "pos"}
        np.testing.assert_allclose([row["probabilities"]["neg"], row["probabilities"]["pos"]], p, atol=1e-5)
        assert row["label"] == ["neg", "pos"][int(np.argmax(p))]
    assert predict.main(["--model", str(tmp_path / "clf"), "--text", "so good"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == "so good"
    assert predict.main(["--model", assets.minilm(), "--text", "x"]) == 2  # a bare encoder: no labels
    assert "sequence classifier" in capsys.readouterr().err
