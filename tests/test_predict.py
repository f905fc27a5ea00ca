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


def test_evaluate_prints_the_metrics_of_a_classifier(tmp_path, capsys):
    from jaxtune import evaluate, metrics

    model = jaxtune.load_pretrained(
        assets.minilm(), task="sequence_classification", id2label=["neg", "pos"], seed=2
    )
    tokenizer = jaxtune.load_tokenizer(assets.minilm())
    jaxtune.save_pretrained(model, tmp_path / "clf", tokenizer=tokenizer)
    rows = [
        ("a gripping film", "pos"),
        ("flat and dull", "neg"),
        ("fine work", "pos"),
        ("a mess", "neg"),
        ("ok", "pos"),
    ]
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    out = tmp_path / "metrics.json"
    assert (
        evaluate.main(
            ["--model", str(tmp_path / "clf"), "--data", str(tmp_path / "dev.jsonl"), "--output", str(out)]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "confusion matrix" in printed
    got = json.loads(out.read_text())
    preds = [r["label"] for r in predict.predict(model, tokenizer, [t for t, _ in rows])]
    want = metrics.classification(
        [["neg", "pos"].index(y) for _, y in rows], [["neg", "pos"].index(p) for p in preds], ["neg", "pos"]
    )
    assert got == want
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x", "label": "neutral"}) + "\n")
    assert evaluate.main(["--model", str(tmp_path / "clf"), "--data", str(tmp_path / "bad.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1" in err and "'neutral'" in err
