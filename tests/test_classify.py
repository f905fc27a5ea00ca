"""The classic fine-tuning workflow on real data: all-MiniLM-L6-v2 on SST-2 subsets from ../shared (these
tests skip with the reason when it is absent). One short training run is shared by several tests: it
evaluates on the whole dev set, keeps the two best checkpoints by accuracy, loads the best at the end
and exports it."""

import json
import shutil
import sys

import numpy as np
import pytest
from runs import one_device

import jaxtune
from jaxtune import assets, checkpoint, crossval, evaluate, predict, train
from jaxtune.config import defaults

METRIC_MODULE = """
import numpy as np


def balanced_error(labels, preds):
    return float(np.mean([np.mean(preds[labels == y] != y) for y in np.unique(labels)]))
"""


def sst2_config(shared_data, **changes):
    c = defaults()
    c.model.path = assets.minilm()
    c.model.task = "sequence_classification"
    c.data.format = "classification"
    c.data.train = str(shared_data / "sst2" / "train.tsv")
    c.data.eval = str(shared_data / "sst2" / "dev.tsv")
    c.data.text_field = "sentence"
    c.data.seq_len = 48
    c.data.pad_to_multiple_of = 16  # rows of 16, 32 or 48 tokens: three step compiles, not six
    c.train.batch_size = 32
    c.optimizer.schedule = "linear"
    c.optimizer.warmup_ratio = 0.1
    c.optimizer.weight_decay = 0.01
    c.optimizer.lr_layer_decay = 0.8
    c.eval.batch_size = 64
    for key, value in changes.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def evals(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "eval"]


@pytest.fixture(scope="module")
def trained(shared_data, tmp_path_factory):
    """MiniLM trained 30 steps on the first 960 SST-2 sentences, evaluated on all 872 dev sentences at
    steps 0, 10, 20 and 30, with a user metric from an import path."""
    where = tmp_path_factory.mktemp("sst2")
    (where / "sst2_metrics.py").write_text(METRIC_MODULE)
    sys.path.insert(0, str(where))
    config = sst2_config(
        shared_data,
        **{
            "data.max_train_records": 960,
            "train.max_steps": 30,
            "optimizer.lr": 1e-4,
            "eval.at_start": True,
            "eval.every_steps": 10,
            "eval.metrics": "sst2_metrics:balanced_error",
            "checkpoint.best_metric": "accuracy",
            "checkpoint.best_keep": 2,
            "checkpoint.load_best_at_end": True,
            "export.at_end": True,
        },
    )
    summary = train.run(config, str(where / "run"), devices=one_device())
    yield where / "run", summary
    sys.path.remove(str(where))
    shutil.rmtree(where)  # 0.6 GB of checkpoints and export; tmp_path_factory would keep it to the end


def test_training_beats_the_untrained_head_on_the_dev_set(trained):
    run, _ = trained
    scores = evals(run)
    assert [e["step"] for e in scores] == [0, 10, 20, 30]
    assert all(e["accuracy"] > 0 for e in scores)
    assert max(e["accuracy"] for e in scores[1:]) > scores[0]["accuracy"] + 0.1, scores
    last = scores[-1]
    assert {"f1_macro", "mcc", "precision/0", "recall/1", "f1/1"} <= set(last)
    # The user metric from eval.metrics: the mean of the per-class error rates.
    assert last["balanced_error"] == pytest.approx(1 - last["recall_macro"], abs=1e-9)
    matrix = json.loads((run / "confusion_matrix.json").read_text())
    assert matrix["labels"] == ["0", "1"] and np.sum(matrix["matrix"]) == 872
    assert (run / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_best_k_keeps_the_two_best_steps_and_the_run_ends_on_the_best(trained):
    run, summary = trained
    accuracy = {e["step"]: e["accuracy"] for e in evals(run) if e["step"]}
    kept = sorted(int(p.name) for p in (run / "checkpoints_best").iterdir() if p.name.isdigit())
    assert len(kept) == 2
    assert sorted(accuracy[s] for s in kept) == sorted(accuracy.values())[-2:]
    record = json.loads((run / "checkpoints_best" / "best.json").read_text())
    assert record["metric"] == "accuracy" and record["value"] == max(accuracy.values())
    assert accuracy[record["step"]] == record["value"]
    if record["step"] != 30:
        assert summary["best_step"] == record["step"]


def test_export_predict_and_evaluate_agree_with_transformers_on_the_dev_set(trained, shared_data, tmp_path):
    """The exported classifier in PyTorch predicts the same label as jaxtune for every dev sentence."""
    import torch
    import transformers

    run, _ = trained
    dev = shared_data / "sst2" / "dev.tsv"
    out = tmp_path / "pred.jsonl"
    args = ["--checkpoint", str(run), "--input", str(dev), "--text-field", "sentence"]
    assert predict.main([*args, "--max-length", "48", "--batch-size", "64", "--output", str(out)]) == 0
    ours = [json.loads(line) for line in out.read_text().splitlines()]
    texts = [r["text"] for r in ours]
    assert len(ours) == 872 and texts[0].startswith("it 's a charming and often affecting journey")

    back = transformers.AutoModelForSequenceClassification.from_pretrained(
        run / "export", dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(run / "export")
    assert back.config.id2label == {0: "0", 1: "1"}
    logits = []
    with torch.no_grad():
        for i in range(0, len(texts), 128):
            enc = tokenizer(
                texts[i : i + 128], padding=True, truncation=True, max_length=48, return_tensors="pt"
            )
            logits.append(back(**enc).logits.numpy())
    logits = np.concatenate(logits)
    theirs = [back.config.id2label[int(i)] for i in logits.argmax(-1)]
    assert [r["label"] for r in ours] == theirs
    probs = np.asarray([[r["probabilities"]["0"], r["probabilities"]["1"]] for r in ours])
    np.testing.assert_allclose(probs, torch.softmax(torch.tensor(logits), -1).numpy(), atol=1e-5)

    # The export predicts the same through jaxtune too, and the best checkpoint is what was exported.
    model, _ = checkpoint.restore_model(str(run))
    from_export = predict.predict(
        jaxtune.load_pretrained(str(run / "export")),
        jaxtune.load_tokenizer(str(run / "export")),
        texts[:64],
        64,
        48,
    )
    assert [r["label"] for r in from_export] == theirs[:64]
    assert model.task.labels == ("0", "1")

    # evaluate: the same predictions scored against the dev labels.
    metrics_file = tmp_path / "m.json"
    plot = tmp_path / "cm.png"
    eargs = ["--checkpoint", str(run), "--data", str(dev), "--text-field", "sentence", "--max-length", "48"]
    assert evaluate.main([*eargs, "--output", str(metrics_file), "--plot", str(plot)]) == 0
    scores = json.loads(metrics_file.read_text())
    gold = [line.rsplit("\t", 1)[1] for line in dev.read_text().splitlines()[1:]]
    assert scores["accuracy"] == pytest.approx(np.mean([g == t for g, t in zip(gold, theirs, strict=True)]))
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_early_stopping_on_dev_accuracy(shared_data, tmp_path):
    config = sst2_config(
        shared_data,
        **{
            "data.max_train_records": 256,
            "data.seq_len": 32,
            "train.max_steps": 40,
            "optimizer.lr": 1e-9,  # nothing moves: no eval gains min_delta
            "eval.at_start": True,
            "eval.every_steps": 2,
            "eval.max_batches": 2,
            "eval.patience": 2,
            "eval.min_delta": 0.01,
            "checkpoint.best_metric": "accuracy",
        },
    )
    summary = train.run(config, str(tmp_path), devices=one_device())
    assert summary["step"] == 4
    assert [e["step"] for e in evals(tmp_path)] == [0, 2, 4]


def test_folds_are_disjoint_stratified_and_cover_the_data():
    rng = np.random.default_rng(0)
    labels = list(rng.choice(["a", "b", "c"], size=103, p=[0.6, 0.3, 0.1]))
    held = crossval.folds(labels, 5, seed=1)
    every = np.concatenate(held)
    assert sorted(every) == list(range(103))  # disjoint and covering
    assert max(map(len, held)) - min(map(len, held)) <= 1
    for y in "abc":
        counts = [sum(labels[i] == y for i in f) for f in held]
        assert max(counts) - min(counts) <= 1, (y, counts)
    assert [list(f) for f in crossval.folds(labels, 5, seed=1)] == [list(f) for f in held]
    assert [list(f) for f in crossval.folds(labels, 5, seed=2)] != [list(f) for f in held]
    plain = crossval.folds(10, 3, seed=0)
    assert sorted(np.concatenate(plain)) == list(range(10)) and sorted(map(len, plain)) == [3, 3, 4]


def test_crossval_runs_every_fold_and_reports_mean_and_std(shared_data, tmp_path, capsys):
    import os

    cfg = tmp_path / "cv.py"
    cfg.write_text(
        "from jaxtune import assets\nfrom jaxtune.config import defaults\n\n\n"
        "def get_config(arg=None):\n"
        "    c = defaults()\n"
        "    c.model.path = assets.minilm()\n"
        "    c.model.task = 'sequence_classification'\n"
        "    c.data.format = 'classification'\n"
        f"    c.data.train = {str(shared_data / 'sst2' / 'train.tsv')!r}\n"
        "    c.data.text_field = 'sentence'\n"
        "    c.data.max_train_records = 60\n"
        "    c.data.seq_len = 32\n"
        "    c.train.batch_size = 8\n"
        "    c.train.max_steps = 2\n"
        "    return c\n"
    )
    argv = ["--config", str(cfg), "--folds", "3", "--workdir", str(tmp_path / "cv")]
    assert crossval.main(argv) == 0
    table = capsys.readouterr().out
    assert "accuracy" in table and "+-" in table
    out = json.loads((tmp_path / "cv" / "crossval.json").read_text())
    assert [f["fold"] for f in out["folds"]] == [0, 1, 2]
    accuracy = [f["metrics"]["accuracy"] for f in out["folds"]]
    assert out["mean"]["accuracy"] == pytest.approx(np.mean(accuracy))
    assert out["std"]["accuracy"] == pytest.approx(np.std(accuracy, ddof=1))
    lines = [line for line in (shared_data / "sst2" / "train.tsv").read_text().splitlines()[1:61]]
    first60 = [(s.strip(), y) for s, y in (line.rsplit("\t", 1) for line in lines)]
    seen = []
    for f in range(3):
        fold = tmp_path / "cv" / f"fold_{f}"
        held = [json.loads(x) for x in (fold / "eval.jsonl").read_text().splitlines()]
        kept = [json.loads(x) for x in (fold / "train.jsonl").read_text().splitlines()]
        assert len(held) == 20 and len(kept) == 40
        assert not {r["sentence"] for r in held} & {r["sentence"] for r in kept}
        seen += [(r["sentence"].strip(), r["label"]) for r in held]
        assert evals(fold)[-1]["step"] == 2
        ones = sum(r["label"] == "1" for r in held)
        assert abs(ones - sum(y == "1" for _, y in first60) / 3) <= 1
    assert sorted(seen) == sorted(first60)
    assert crossval.main([*argv[:2], "--folds", "1", "--workdir", str(tmp_path / "cv1")]) == 2
    assert "--folds 1: cross-validation needs at least 2 folds" in capsys.readouterr().err
    # A rerun finds every fold finished and trains nothing.
    stamps = [os.path.getmtime(tmp_path / "cv" / f"fold_{f}" / "metrics.jsonl") for f in range(3)]
    assert crossval.main(argv) == 0
    assert [os.path.getmtime(tmp_path / "cv" / f"fold_{f}" / "metrics.jsonl") for f in range(3)] == stamps
    assert capsys.readouterr().out == table
    # Another split on the same workdir would reuse folds (and checkpoints) of the old one: refused.
    assert crossval.main([*argv[:2], "--folds", "2", "--workdir", str(tmp_path / "cv")]) == 2
    assert "holds the folds of another split" in capsys.readouterr().err
    assert not (tmp_path / "cv" / "fold_0" / "export").exists()  # folds measure; they export nothing
