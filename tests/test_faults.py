"""Fault injection: hostile and careless inputs, kills, damage and races. Each case either gets one
clear line naming the file, key or step and the way out, or goes on with nothing lost; none gives a
silently wrong result."""

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from flax import nnx
from hf_models import make_model
from runs import losses, metrics, tiny_config, write_labelled

import jaxtune
from jaxtune import checkpoint, crossval, evaluate, export, predict, train
from jaxtune.checkpoint import BestRanking
from jaxtune.config import validate
from jaxtune.data import sources, textids
from jaxtune.errors import ConfigError, DataError, ModelError, WorkdirBusy
from jaxtune.workdir import Lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.py")
ONE_DEVICE = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Two separable classes: accuracy reaches 1.0 within a few steps and then ties at every eval."""
    return write_labelled(tmp_path_factory.mktemp("clf") / "d.jsonl", 64)


def config_of(text_file, **changes):
    return tiny_config(text_file, **({"train.max_steps": 6} | changes))


def classifier(data_file, **changes):
    base = {
        "model.task": "sequence_classification",
        "data.format": "classification",
        "data.eval": data_file,
        "data.eval_fraction": 0.0,
        "train.max_steps": 16,
        "eval.every_steps": 2,
        "checkpoint.best_metric": "accuracy",
        "checkpoint.every_steps": 0,
        "optimizer.lr": 1e-2,
    }
    return config_of(data_file, **(base | changes))


def rows(workdir, split=None):
    return metrics(workdir, split) if split else metrics(workdir, "train") + metrics(workdir, "eval")


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1] if err else ""
    assert last.startswith("error: "), err
    return last


def smoke_cli(workdir, *extra):
    return [sys.executable, "-m", "jaxtune.train", "--config", SMOKE, "--workdir", str(workdir), *extra]


def endless_run(workdir, text_file, train_rows: int = 1):
    """A smoke run in a subprocess that trains until it is stopped, once it has logged ``train_rows``."""
    cmd = smoke_cli(
        workdir,
        f"--config.data.train={text_file}",
        "--config.train.max_steps=100000",
        "--config.checkpoint.every_steps=0",
        "--config.eval.every_steps=0",
    )
    proc = subprocess.Popen(cmd, env=ONE_DEVICE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (workdir / "metrics.jsonl").exists() and len(metrics(workdir)) >= train_rows:
            break
        time.sleep(0.2)
    return proc


# -- 1. best checkpoints: one rule for what is kept and what best.json names ---------------------------


def test_best_ranking_breaks_ties_for_the_earlier_step():
    ranking = BestRanking(keep=2, mode="max")
    assert ranking.offer(2, 0.5) == (True, [])
    assert ranking.offer(4, 0.9) == (True, [])
    assert ranking.offer(6, 0.9) == (True, [2])  # ties with 4, beats 2; 4 stays ahead of it
    assert ranking.kept == [(4, 0.9), (6, 0.9)] and ranking.best == (4, 0.9)
    assert ranking.offer(8, 0.9) == (False, [])  # a third tie displaces neither
    assert ranking.offer(10, 0.95) == (True, [6])
    assert ranking.kept == [(10, 0.95), (4, 0.9)] and ranking.best == (10, 0.95)
    low = BestRanking(keep=1, mode="min")
    low.offer(2, 1.0)
    assert low.offer(4, 1.0) == (False, []) and low.best == (2, 1.0)
    assert ranking.until(4) == [10] and ranking.kept == [(4, 0.9)]
    odd = BestRanking(keep=2, mode="max")
    odd.offer(2, float("nan"))  # a NaN metric never ranks above a real one
    assert odd.offer(4, 0.1) == (True, []) and odd.offer(6, 0.2) == (True, [2]) and odd.best == (6, 0.2)


def test_best_json_steps_whose_save_never_finished_are_forgotten(tmp_path):
    best = tmp_path / "checkpoints_best"
    best.mkdir()
    (best / "best.json").write_text(
        json.dumps({"metric": "loss", "step": 8, "value": 0.1, "kept": [[8, 0.1]]})
    )
    ckpt = checkpoint.Checkpoints(str(tmp_path), best_metric="loss", best_mode="min")
    assert ckpt.best_step() is None  # step 8 is not on disk (killed mid-save): nothing to restore
    ckpt.close()


@pytest.mark.parametrize("keep", [1, 2])
def test_tied_best_metric_every_command_finds_the_step_best_json_names(keep, labelled, tmp_path, capsys):
    workdir = tmp_path / "run"
    config = classifier(labelled, **{"checkpoint.best_keep": keep, "checkpoint.load_best_at_end": True})
    summary = train.run(config, str(workdir))
    accuracy = {r["step"]: r["accuracy"] for r in rows(workdir, "eval")}
    top = max(accuracy.values())
    tied = sorted(s for s, a in accuracy.items() if a == top)
    assert len(tied) >= keep + 1, accuracy  # the case in question: more tied steps than are kept
    record = json.loads((workdir / "checkpoints_best" / "best.json").read_text())
    kept = sorted(int(p.name) for p in (workdir / "checkpoints_best").iterdir() if p.name.isdigit())
    assert record["step"] == tied[0] and kept == tied[:keep]  # the earliest of the tied steps
    assert summary["best_step"] == tied[0]  # load_best_at_end restored it
    assert evaluate.main(["--checkpoint", str(workdir), "--data", labelled]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert predict.main(["--checkpoint", str(workdir), "--text", "good fine nice"]) == 0
    assert json.loads(capsys.readouterr().out)["label"] == "pos"
    assert export.main(["--checkpoint", str(workdir), "--out", str(tmp_path / "hf")]) == 0


# -- 2. data: ragged CSV rows, bytes that are not UTF-8, broken YAML -----------------------------------


@pytest.mark.parametrize(
    "line,words",
    [
        ("a fine, fine film,pos\n", ["3 comma-separated fields", "header has 2", "quote"]),
        ("lonely\n", ["1 fields where the header has 2"]),
    ],
)
def test_a_csv_row_with_the_wrong_number_of_fields_names_its_line(tmp_path, line, words):
    path = tmp_path / "d.csv"
    path.write_text("text,label\ngood film,pos\n" + line + "bad film,neg\n")
    with pytest.raises(DataError) as e:
        sources.read(str(path))
    msg = str(e.value)
    assert "\n" not in msg and f"{path}:3:" in msg and all(w in msg for w in words), msg


def test_a_quoted_multi_line_csv_field_is_one_record_named_by_its_first_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"two\nlines",pos\nok,neg\n')
    assert [(r["label"], o) for r, o in sources.read(str(path))] == [
        ("pos", f"{path}:2"),
        ("neg", f"{path}:4"),
    ]


WINDOWS = {
    "d.tsv": "text\tlabel\r\ngood\tpos\r\n",
    "d.csv": "text,label\r\ngood,pos\r\n",
    "d.jsonl": '{"text": "good", "label": "pos"}\r\n',
    "d.txt": "good\r\nday\r\n",
}


@pytest.mark.parametrize("name", sorted(WINDOWS))
def test_windows_line_endings_read_as_plain_ones(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(WINDOWS[name].encode())
    records = [r for r, _ in sources.read(str(path))]
    assert records == ([{"text": "good\nday\n"}] if name == "d.txt" else [{"text": "good", "label": "pos"}])


GOOD_LINES = {  # a header (if any) and three good lines, then a line with a Latin-1 byte
    "d.jsonl": (b'{"text": "fine"}\n' * 4, b'{"text": "caf\xe9"}\n'),
    "d.csv": (b"text,label\n" + b"fine,a\n" * 3, b"caf\xe9,b\n"),
    "d.tsv": (b"text\tlabel\n" + b"fine\ta\n" * 3, b"caf\xe9\tb\n"),
    "d.txt": (b"fine\n" * 4, b"caf\xe9 au lait\n"),
    "d.yml": (b"categories:\n- x\nconversations:\n- - hi\n", b"  - caf\xe9\n"),
}


@pytest.mark.parametrize("name", sorted(GOOD_LINES))
def test_bytes_that_are_not_utf8_name_the_file_line_and_offset(tmp_path, name):
    good, bad = GOOD_LINES[name]
    path = tmp_path / name
    path.write_bytes(good + bad)
    with pytest.raises(DataError) as e:
        sources.read(str(path))
    msg = str(e.value)
    offset = len(good) + bad.index(b"\xe9")
    assert "\n" not in msg and f"{path}:5:" in msg and f"byte 0xe9 at offset {offset}" in msg, msg


def test_train_and_predict_report_binary_data_in_one_line(tmp_path, capsys):
    data = tmp_path / "blob.txt"
    data.write_bytes(bytes(range(256)) * 4)
    assert train.main([*smoke_cli(tmp_path / "w")[3:], f"--config.data.train={data}"]) == 2
    line = error_line(capsys)
    assert f"{data}:2:" in line and "byte 0x80 at offset 128" in line  # the first byte above 127
    bad = tmp_path / "in.jsonl"
    bad.write_bytes(b'{"text": "caf\xe9"}\n')
    assert predict.main(["--model", str(_classifier_dir(tmp_path)), "--input", str(bad)]) == 2
    line = error_line(capsys)
    assert f"{bad}:1:" in line and "not UTF-8" in line


def _classifier_dir(tmp_path):
    path = tmp_path / "hf_clf"
    if not path.exists():
        from jaxtune import pretrained

        make_model("bert", task="sequence_classification", vocab_size=300).save_pretrained(path)
        pretrained.byte_tokenizer().save_pretrained(path)
    return path


def test_a_control_character_in_json_is_named_once_with_its_column(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "tab\there"}\n')
    with pytest.raises(DataError) as e:
        sources.read(str(path))
    assert f"{path}:2: not valid JSON (Invalid control character at column 14)" in str(e.value), str(e.value)


def test_broken_yaml_names_the_line(tmp_path):
    path = tmp_path / "d.yml"
    path.write_text("categories:\n- x\nconversations:\n- - hi\n  - [unclosed\n")
    with pytest.raises(DataError) as e:
        sources.read(str(path))
    assert str(path) in str(e.value) and "not valid YAML" in str(e.value)


# -- 3. export into a folder that held another model ----------------------------------------------------


def test_export_refuses_a_non_empty_folder_and_overwrite_leaves_no_stale_weights(tmp_path, capsys):
    import torch
    import transformers

    src = tmp_path / "src"
    make_model("llama").save_pretrained(src)
    old = tmp_path / "out"
    other = make_model("llama", seed=7)
    jaxtune.save_pretrained(
        jaxtune.load_pretrained(_save(other, tmp_path / "other")), old, max_shard_bytes=20_000
    )
    assert (old / "model.safetensors.index.json").exists()
    assert export.main(["--model", str(src), "--out", str(old)]) == 2
    line = error_line(capsys)
    assert str(old) in line and "not empty" in line and "--overwrite" in line
    assert export.main(["--model", str(src), "--out", str(old), "--overwrite"]) == 0
    assert sorted(p.name for p in old.glob("*.safetensors*")) == ["model.safetensors"]
    ids = np.array([[1, 5, 9, 2]])
    want = np.asarray(jaxtune.load_pretrained(str(src))(ids))
    np.testing.assert_allclose(np.asarray(jaxtune.load_pretrained(str(old))(ids)), want, atol=1e-5, rtol=0)
    back = transformers.AutoModelForCausalLM.from_pretrained(old, dtype=torch.float32).eval()
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.tensor(ids)).logits.numpy(), want, atol=1e-5, rtol=0)


def _save(model, path):
    model.save_pretrained(path)
    return str(path)


def test_load_prefers_model_safetensors_over_an_index_as_transformers_does(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_model("llama").save_pretrained(a)
    jaxtune.save_pretrained(
        jaxtune.load_pretrained(_save(make_model("llama", seed=3), b)), b / "sharded", max_shard_bytes=20_000
    )
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for p in (b / "sharded").iterdir():
        (mixed / p.name).write_bytes(p.read_bytes())
    for name in ("config.json", "model.safetensors"):
        (mixed / name).write_bytes((a / name).read_bytes())
    ids = np.array([[3, 4, 5]])
    np.testing.assert_array_equal(
        np.asarray(jaxtune.load_pretrained(str(mixed))(ids)), np.asarray(jaxtune.load_pretrained(str(a))(ids))
    )


# -- 4. two runs on one workdir ------------------------------------------------------------------------


def test_a_second_run_on_a_busy_workdir_is_refused_naming_the_first(text_file, tmp_path, capsys):
    workdir = tmp_path / "run"
    proc = endless_run(workdir, text_file)
    try:
        assert train.main(smoke_cli(workdir, f"--config.data.train={text_file}")[3:]) == 1
        line = error_line(capsys)
        assert f"pid {proc.pid}" in line and "in use by another run" in line and "--workdir" in line
        with pytest.raises(WorkdirBusy):
            with Lock(str(workdir)):
                pass
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    # The lock went with the process: the workdir is free again (a dead run never blocks the next).
    with Lock(str(workdir)):
        pass


def test_a_lock_file_left_by_a_killed_run_does_not_block(text_file, tmp_path):
    workdir = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from jaxtune.workdir import Lock\nwith Lock({str(workdir)!r}):\n    input()",
        ],
        stdin=subprocess.PIPE,
    )
    deadline = time.time() + 30
    while time.time() < deadline and not (workdir / ".lock").exists():
        time.sleep(0.1)
    time.sleep(0.5)
    with pytest.raises(WorkdirBusy):
        with Lock(str(workdir)):
            pass
    holder.kill()
    holder.wait()
    assert json.loads((workdir / ".lock").read_text())["pid"] == holder.pid  # the file stays ...
    assert (
        train.run(config_of(text_file, **{"train.max_steps": 2}), str(workdir))["step"] == 2
    )  # ... harmless


# -- 5. kill -9 in the middle of asynchronous saves ----------------------------------------------------


@pytest.fixture(scope="module")
def straight(text_file, tmp_path_factory):
    """An uninterrupted 24-step run on one device: the losses every interrupted run must reproduce."""
    workdir = tmp_path_factory.mktemp("straight")
    train.run(
        config_of(text_file, **{"train.max_steps": 24, "data.eval_fraction": 0.0}),
        str(workdir),
        devices=jax.devices()[:1],
    )
    return losses(workdir)


@pytest.mark.parametrize("after_rows", [3, 9, 15])
def test_kill_9_during_asynchronous_saves_resumes_to_the_uninterrupted_losses(
    after_rows, straight, text_file, tmp_path
):
    workdir = tmp_path / "run"
    cmd = smoke_cli(
        workdir,
        f"--config.data.train={text_file}",
        "--config.data.eval_fraction=0.0",
        "--config.data.seq_len=32",
        "--config.train.max_steps=24",
        "--config.optimizer.warmup_steps=2",
        "--config.checkpoint.every_steps=1",  # a save in flight at almost every moment
        "--config.checkpoint.async_save=true",
        "--config.eval.every_steps=0",
    )
    proc = subprocess.Popen(cmd, env=ONE_DEVICE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (workdir / "metrics.jsonl").exists() and len(rows(workdir)) >= after_rows:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    config = config_of(text_file, **{"train.max_steps": 24, "data.eval_fraction": 0.0})
    config.checkpoint.every_steps = 1
    summary = train.run(config, str(workdir), devices=jax.devices()[:1])
    assert summary["step"] == 24
    got = rows(workdir, "train")
    assert [r["step"] for r in got] == list(range(1, 25))  # one row per step, none repeated
    # The same run, not a drifting one: equal to rounding (a reported loss differs by at most 1 ulp at
    # a few steps, with no growth, between this 1-device process and the 8-device test process).
    np.testing.assert_allclose(
        [r["loss"] for r in got], [straight[s] for s in range(1, 25)], rtol=1e-6, atol=0
    )


# -- 6. damaged checkpoints ----------------------------------------------------------------------------


def _damage(step_dir, how):
    import glob
    import shutil

    if how == "meta":
        shutil.rmtree(step_dir / "meta")
    elif how == "truncated":
        for f in glob.glob(str(step_dir / "params" / "ocdbt.process_0" / "d" / "*")):
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)
    elif how == "manifest":
        os.remove(step_dir / "params" / "manifest.ocdbt")


@pytest.mark.parametrize("how", ["meta", "truncated", "manifest"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(how, text_file, tmp_path, caplog):
    changes = {"train.max_steps": 8, "checkpoint.every_steps": 2, "data.eval_fraction": 0.0}
    train.run(config_of(text_file, **changes), str(tmp_path / "straight"))
    workdir = tmp_path / "run"
    train.run(config_of(text_file, **changes), str(workdir), stop_after=6)
    _damage(workdir / "checkpoints" / "6", how)
    # An export of the damaged workdir takes step 4, with a warning naming step 6.
    with caplog.at_level("WARNING"):
        model, _ = checkpoint.restore_model(str(workdir))
    assert "checkpoints/6 is damaged" in caplog.text
    with pytest.raises(checkpoint.CheckpointError, match="/6: the checkpoint is damaged"):
        checkpoint.restore_model(str(workdir / "checkpoints" / "6"))  # asked for by name: no substitute
    caplog.clear()
    with caplog.at_level("WARNING"):
        summary = train.run(config_of(text_file, **changes), str(workdir))
    assert (
        "checkpoint 6 in" in caplog.text
        and "damaged" in caplog.text
        and "resuming from step 4" in caplog.text
    )
    assert summary["step"] == 8 and (workdir / "checkpoints_damaged" / "6").is_dir()
    assert [r["step"] for r in rows(workdir, "train")] == list(range(1, 9))
    want = losses(tmp_path / "straight")
    assert losses(workdir) == want


def test_no_intact_checkpoint_is_one_line(text_file, tmp_path, capsys):
    changes = {"train.max_steps": 4, "checkpoint.every_steps": 2, "data.eval_fraction": 0.0}
    train.run(config_of(text_file, **changes), str(tmp_path), stop_after=4)
    for step in (2, 4):
        _damage(tmp_path / "checkpoints" / str(step), "meta")
    with pytest.raises(checkpoint.CheckpointError) as e:
        train.run(config_of(text_file, **changes), str(tmp_path))
    assert "\n" not in str(e.value) and "no intact checkpoint" in str(e.value) and "[2, 4]" in str(e.value)


def test_a_damaged_best_checkpoint_gives_way_to_the_next_best(labelled, tmp_path, caplog):
    config = classifier(
        labelled,
        **{"checkpoint.best_keep": 2, "checkpoint.best_metric": "loss", "checkpoint.best_mode": "min"},
    )
    train.run(config, str(tmp_path))
    record = json.loads((tmp_path / "checkpoints_best" / "best.json").read_text())
    first, second = (s for s, _ in record["kept"])
    _damage(tmp_path / "checkpoints_best" / str(first), "truncated")
    with caplog.at_level("WARNING"):
        model, _ = checkpoint.restore_model(str(tmp_path))
    assert f"checkpoints_best/{first} is damaged" in caplog.text
    want, _ = checkpoint.restore_model(str(tmp_path / "checkpoints_best" / str(second)))
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(want)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# -- 7. model files: truncated, pickled code, remote code ----------------------------------------------


def test_a_truncated_safetensors_file_is_one_line_in_the_library_and_the_cli(tmp_path, capsys):
    src = tmp_path / "m"
    make_model("llama", vocab_size=320).save_pretrained(src)
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelError) as e:
        jaxtune.load_pretrained(str(src))
    assert str(weights) in str(e.value) and "\n" not in str(e.value)
    assert (
        train.main(
            [*smoke_cli(tmp_path / "w")[3:], f"--config.model.path={src}", "--config.model.tokenizer=bytes"]
        )
        == 2
    )
    assert str(weights) in error_line(capsys)


class _Payload:
    """A pickle that would create a file when loaded: the side effect proves code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_holding_code_is_refused_with_safe_advice_and_runs_nothing(tmp_path, capsys):
    import torch

    src = tmp_path / "m"
    make_model("llama").save_pretrained(src)
    (src / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    with open(src / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Payload(str(marker))}, f)
    with pytest.raises(ModelError) as e:
        jaxtune.load_pretrained(str(src))
    msg = str(e.value)
    assert "never runs code" in msg and "safetensors" in msg and "weights_only=False" not in msg
    assert not marker.exists()
    torch.save({"x": torch.zeros(1)}, tmp_path / "ok.bin")  # torch itself still works after the refusal
    assert export.main(["--model", str(src), "--out", str(tmp_path / "o")]) == 2
    line = error_line(capsys)
    assert "never runs code" in line and "weights_only=False" not in line and not marker.exists()


def test_a_tokenizer_that_needs_remote_code_is_refused_and_runs_nothing(tmp_path):
    src = tmp_path / "m"
    make_model("llama").save_pretrained(src)
    marker = tmp_path / "ran"
    (src / "tok.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass MyTok:\n    pass\n")
    (src / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "MyTok", "auto_map": {"AutoTokenizer": ["tok.MyTok", None]}})
    )
    with pytest.raises(ModelError) as e:
        jaxtune.load_tokenizer(str(src))
    msg = str(e.value)
    assert "never runs code from a model directory" in msg and "trust_remote_code=True" not in msg, msg
    assert not marker.exists()


# -- 8. configs: syntax errors, no get_config, NaN, bad values on the command line ---------------------


@pytest.mark.parametrize(
    "source,words",
    [
        (
            "from jaxtune.config import defaults\n\ndef get_config(arg=None)\n    return defaults()\n",
            [":3:", "fix the config file"],
        ),
        ("X = 1\n", ["defines no get_config()"]),
        ("def get_config(arg=None):\n    c = {}\n    return c['model']\n", [":3:", "KeyError"]),
        ("def get_config(arg=None):\n    return 3\n", ["returned a int"]),
    ],
)
def test_a_broken_config_file_is_one_line_naming_its_file_and_line(tmp_path, capsys, source, words):
    path = tmp_path / "bad.py"
    path.write_text(source)
    assert train.main(["--config", str(path), "--workdir", str(tmp_path / "w")]) == 2
    line = error_line(capsys)
    assert str(path) in line and all(w in line for w in words), line
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "key", ["optimizer.lr", "optimizer.clip_norm", "optimizer.weight_decay", "eval.min_delta"]
)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_infinite_floats_are_refused_by_validate(text_file, key, value):
    config = config_of(text_file)
    section, leaf = key.split(".")
    config[section][leaf] = value
    with pytest.raises(ConfigError) as e:
        validate(config)
    assert key in str(e.value) and "not a finite number" in str(e.value)


def test_command_line_values_of_the_wrong_type_or_not_finite(tmp_path, capsys):
    base = ["--config", SMOKE, "--workdir", str(tmp_path / "w")]
    assert train.main([*base, "--config.optimizer.lr=nan"]) == 2
    assert "optimizer.lr = nan is not a finite number" in error_line(capsys)
    assert train.main([*base, "--config.data.packing=maybe"]) == 2
    assert "data.packing" in error_line(capsys)
    assert train.main([*base, "stray"]) == 2
    assert "unknown argument 'stray'" in error_line(capsys)
    from jaxtune import cli

    config = cli.load_config(
        SMOKE,
        ["--config.sample.prompts=Hi there", "--noconfig.checkpoint.async_save", "--config.train.seed", "3"],
    )
    assert (
        config.sample.prompts == ("Hi there",)
        and config.checkpoint.async_save is False
        and config.train.seed == 3
    )


# -- 9. every command: --help, bad flags, outputs checked before any work ------------------------------


@pytest.mark.parametrize("module", [train, crossval, export, predict, evaluate])
def test_every_command_has_help(module, capsys):
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m jaxtune.") and "--help" in out


def test_predict_and_evaluate_check_their_outputs_and_sizes_before_any_work(tmp_path, capsys):
    clf = _classifier_dir(tmp_path)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a", "label": "LABEL_0"}\n')
    afile = tmp_path / "plain.txt"
    afile.write_text("x")
    missing = str(tmp_path / "nowhere" / "model")  # load would fail: an output error must come first
    cases = [
        (
            predict,
            ["--model", missing, "--text", "x", "--output", str(afile / "out.jsonl")],
            "does not exist",
        ),
        (predict, ["--model", missing, "--text", "x", "--output", str(tmp_path)], "a directory stands there"),
        (evaluate, ["--model", missing, "--data", str(data), "--output", str(afile / "m.json")], "--output"),
        (evaluate, ["--model", missing, "--data", str(data), "--plot", str(tmp_path)], "--plot"),
        (
            predict,
            ["--model", str(clf), "--text", "x", "--batch-size", "0"],
            "--batch-size 0: must be at least 1",
        ),
        (predict, ["--model", str(clf), "--text", ""], "--text is empty"),
        (export, ["--model", missing, "--out", str(afile)], "a file stands there"),
        (evaluate, ["--model", str(clf), "--data", str(tmp_path / "no.jsonl")], "--data: "),
    ]
    for module, args, words in cases:
        assert module.main(args) == 2, args
        line = error_line(capsys)
        assert words in line and "config key --data" not in line, (args, line)


def test_export_of_a_workdir_without_checkpoints_says_so(text_file, tmp_path, capsys):
    (tmp_path / "model").mkdir()
    jaxtune.pretrained.write_config(
        jaxtune.pretrained.model_from_config(
            __import__("jaxtune.models.presets", fromlist=["x"]).hf_config("llama-tiny")
        ),
        tmp_path / "model",
        "float32",
    )
    (tmp_path / "checkpoints").mkdir()
    assert export.main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    line = error_line(capsys)
    assert "no complete checkpoint yet" in line and "step None" not in line


# -- 10. bad model directories and workdirs through the train CLI --------------------------------------


@pytest.mark.parametrize("damage", ["bad json", "unknown model_type", "wrong shape"])
def test_a_bad_model_directory_is_one_line_from_train(damage, tmp_path, capsys):
    src = tmp_path / "m"
    make_model("llama", vocab_size=320).save_pretrained(src)
    cfg = json.loads((src / "config.json").read_text())
    if damage == "bad json":
        (src / "config.json").write_text("{not json")
    else:
        cfg.update(model_type="mamba9") if damage == "unknown model_type" else cfg.update(
            intermediate_size=48
        )
        (src / "config.json").write_text(json.dumps(cfg))
    assert (
        train.main(
            [*smoke_cli(tmp_path / "w")[3:], f"--config.model.path={src}", "--config.model.tokenizer=bytes"]
        )
        == 2
    )
    assert str(src) in error_line(capsys)


def test_a_file_where_the_workdir_should_be_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert train.main(["--config", SMOKE, "--workdir", str(blocker / "run")]) == 1
    line = error_line(capsys)
    assert str(blocker) in line and "a file stands where a directory should be" in line


# -- 11. a failed rerun keeps the run's files; a resume leaves one metrics row per step ----------------


def test_a_failed_rerun_leaves_config_json_and_metrics_as_they_were(text_file, tmp_path, capsys):
    train.run(config_of(text_file, **{"train.max_steps": 2}), str(tmp_path))
    before = {n: (tmp_path / n).read_text() for n in ("config.json", "metrics.jsonl", "model/config.json")}
    args = ["--config", SMOKE, "--workdir", str(tmp_path), "--config.data.train=/no/such.txt"]
    assert train.main(args) == 2
    assert "/no/such.txt" in error_line(capsys)
    assert {n: (tmp_path / n).read_text() for n in before} == before


def test_metrics_after_a_resume_have_one_row_per_step(text_file, tmp_path):
    changes = {"train.max_steps": 10, "checkpoint.every_steps": 4, "eval.every_steps": 3}
    train.run(config_of(text_file, **changes), str(tmp_path))
    import shutil

    shutil.rmtree(tmp_path / "checkpoints" / "10")  # as if killed before the final save: resume at 8
    train.run(config_of(text_file, **changes), str(tmp_path))
    keys = [(r["step"], r["split"]) for r in rows(tmp_path)]
    assert len(keys) == len(set(keys)) and [s for s, split in keys if split == "train"] == list(range(1, 11))


# -- 12. stopping: Ctrl-C saves; a second signal or a stuck stop exits at once -------------------------


def test_ctrl_c_saves_and_exits_then_the_run_resumes(text_file, tmp_path):
    workdir = tmp_path / "run"
    proc = endless_run(workdir, text_file, train_rows=3)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "SIGINT" in out, out
    assert checkpoint.Checkpoints(str(workdir)).latest() == max(losses(workdir))


STUCK = textwrap.dedent(
    """
    import os, sys
    from jaxtune.stopping import StopSignals
    with StopSignals(float(sys.argv[1]), sys.argv[2]):
        print("ready", flush=True)
        read, write = os.pipe()
        os.read(read, 1)  # stuck: nothing ever writes
    """
)


@pytest.mark.parametrize("second", [True, False])
def test_a_stuck_run_is_ended_by_a_second_signal_or_the_stop_timeout(second, tmp_path):
    (tmp_path / "checkpoints" / "12").mkdir(parents=True)
    timeout = "0" if second else "1.5"
    proc = subprocess.Popen(
        [sys.executable, "-c", STUCK, timeout, str(tmp_path / "checkpoints")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    if second:
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    last = err.strip().splitlines()[-1]
    why = "a second SIGTERM" if second else "was not done after 1.5 s (train.stop_timeout_s)"
    assert last.startswith("error: ") and why in last and "last complete checkpoint is step 12" in last, err


# -- 13. memory: a large text is tokenized in bounded pieces with the same ids -------------------------


def test_chunked_tokenization_gives_the_ids_of_the_whole_text(shared_data):
    from jaxtune import assets

    text = (shared_data / "tiny_shakespeare" / "input.txt").read_text()[:200_000]
    for tokenizer in (jaxtune.load_tokenizer(assets.smollm2()), jaxtune.pretrained.byte_tokenizer()):
        whole = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
        assert len(textids.cuts(tokenizer, text, 2000)) > 50  # many cuts, each checked
        got = np.concatenate(list(textids.text_ids(tokenizer, [text, "a short one"], 2000)))
        short = np.asarray(tokenizer("a short one", add_special_tokens=False)["input_ids"], np.int32)
        np.testing.assert_array_equal(got, np.concatenate([whole, short]))


MEMORY = textwrap.dedent(
    """
    import resource, sys
    from jaxtune import assets, data, pretrained
    tokenizer = pretrained.load_tokenizer(assets.smollm2())
    line = "KING HENRY: thou art the quick brown fox, my lord, and the lazy dog.\\n"
    text = line * (int(sys.argv[1]) * 1_000_000 // len(line))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows = data.text_rows([({"text": text}, "x")], tokenizer, 128)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024 / len(text), rows["tokens"].shape[0])
    """
)


def test_tokenizing_a_large_text_file_takes_a_small_multiple_of_its_size():
    out = subprocess.run(
        [sys.executable, "-c", MEMORY, "20"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert out.returncode == 0, out.stderr
    ratio, n_rows = out.stdout.split()
    assert int(n_rows) > 20_000
    assert float(ratio) < 30, ratio  # it was about 150-190 times the text in one tokenizer call
