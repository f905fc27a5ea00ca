"""The training engine on CPU (8 host devices): sharding equivalence, gradient accumulation, per-layer
learning rates, compile-once, resume, preemption, metrics, configs and config errors."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from runs import losses, metrics, one_device, tiny_config

import jaxtune
from jaxtune import checkpoint, hostmem, optim, steps, train
from jaxtune.config import ConfigError, defaults, validate
from jaxtune.losses import causal_lm_loss
from jaxtune.plan import load_model


def test_sharded_and_single_device_runs_give_the_same_losses(text_file, tmp_path):
    runs = {
        "single": (dict(**{"mesh.data": 1}), jax.devices()[:1]),
        "fsdp4_tensor2": ({"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2}, None),
        "data8": ({"mesh.data": 8}, None),
    }
    got = {}
    for name, (changes, devices) in runs.items():
        train.run(tiny_config(text_file, **changes), str(tmp_path / name), devices=devices)
        got[name] = losses(tmp_path / name)
    assert sorted(got["single"]) == [1, 2, 3, 4, 5]
    for name in ("fsdp4_tensor2", "data8"):
        np.testing.assert_allclose(
            [got[name][s] for s in range(1, 6)], [got["single"][s] for s in range(1, 6)], atol=1e-5, rtol=0
        )
    assert got["single"][5] < got["single"][1]


def test_fsdp_and_tensor_parallel_shard_the_parameters(text_file):
    from jaxtune import sharding

    config = tiny_config(text_file, **{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2})
    mesh = sharding.make_mesh(config)
    model = load_model(config, mesh, config.mesh.rules)
    specs = {
        path: var.get_value().sharding.spec for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    assert specs[("embed",)] == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert specs[("layers", "mlp", "up_proj", "kernel")] == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert specs[("layers", "attn", "q_proj", "kernel")] == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor", None
    )
    shard = model.embed.get_value().addressable_shards[0].data
    assert shard.shape == (320 // 2, 64 // 4)  # each device holds only its block


def _tiny_model():
    from jaxtune.models import presets

    return jaxtune.pretrained.model_from_config(presets.hf_config("llama-tiny"), seed=1)


def _batch(rng, b=8, t=16):
    ids = rng.randint(0, 256, (b, t + 1))
    mask = np.ones((b, t), np.float32)
    mask[1, 10:] = 0
    return {
        "input_ids": jnp.asarray(ids[:, :-1]),
        "targets": jnp.asarray(ids[:, 1:]),
        "loss_mask": jnp.asarray(mask),
        "attention_mask": jnp.ones((b, t), jnp.int32),
    }


def _state(tx, params):
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def test_gradient_accumulation_equals_one_big_step():
    graphdef, state = nnx.split(_tiny_model())
    params = nnx.to_pure_dict(state)
    c = defaults().optimizer
    c.name, c.lr, c.schedule, c.clip_norm = "sgd", 0.5, "constant", 0.0
    tx, lr = optim.make(c, params, 10, 2)
    batch = _batch(np.random.RandomState(0))
    out = {}
    for accum in (1, 4):
        step = steps.make_train_step(
            graphdef, tx, lr, compute_dtype=jnp.float32, accum_steps=accum, chunk_tokens=40
        )
        out[accum] = jax.jit(step)(_state(tx, params), {}, batch)
    np.testing.assert_allclose(float(out[4][1]["loss"]), float(out[1][1]["loss"]), atol=1e-6, rtol=0)
    for a, b in zip(jax.tree.leaves(out[4][0]["params"]), jax.tree.leaves(out[1][0]["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.abs(a - b).max(), out[1][0]["params"], params))
    assert max(float(m) for m in moved) > 1e-4  # the step did move the parameters


def test_per_layer_learning_rates_and_frozen_parameters():
    graphdef, state = nnx.split(_tiny_model())
    everything = nnx.to_pure_dict(state)
    c = defaults().optimizer
    c.name, c.lr, c.schedule, c.clip_norm = "sgd", 0.1, "constant", 0.0
    c.lr_layer_decay = 0.5
    c.lr_multipliers = (("attn\\.q_proj", 3.0), ("attn", 7.0), ("final_norm", 0.25))
    c.frozen = ("lm_head", "layers\\.mlp_norm")
    frozen, params = optim.split(everything, optim.frozen_matcher(c.frozen))
    assert set(optim.paths(frozen)) == {"lm_head", "layers.mlp_norm.weight"}
    tx, lr = optim.make(c, params, 10, 2)
    batch = _batch(np.random.RandomState(1))
    step = steps.make_train_step(graphdef, tx, lr, compute_dtype=jnp.float32, accum_steps=1, chunk_tokens=64)
    new, _ = jax.jit(step)(_state(tx, params), frozen, batch)

    def loss(p):
        total, count = causal_lm_loss(nnx.merge(graphdef, p, frozen), batch, 64)
        return total / count

    grads = jax.grad(loss)(params)
    # Two layers: layer i gets 0.5 ** (2 - i); embeddings 0.5 ** 3; what is above the layers 1.
    layer = np.array([0.5**2, 0.5**1])
    expected_multiplier = {
        "embed": 0.5**3,
        "final_norm.weight": 0.25,
        "layers.attn.q_proj.kernel": 3.0 * layer,  # the first matching pattern wins
        "layers.attn.k_proj.kernel": 7.0 * layer,
        "layers.attn.v_proj.kernel": 7.0 * layer,
        "layers.attn.o_proj.kernel": 7.0 * layer,
        "layers.attn_norm.weight": 7.0 * layer,
        "layers.mlp.gate_proj.kernel": layer,
        "layers.mlp.up_proj.kernel": layer,
        "layers.mlp.down_proj.kernel": layer,
    }
    flat = dict(zip(optim.paths(params), jax.tree.leaves(params), strict=True))
    flat_new = dict(zip(optim.paths(new["params"]), jax.tree.leaves(new["params"]), strict=True))
    flat_grad = dict(zip(optim.paths(grads), jax.tree.leaves(grads), strict=True))
    assert set(flat) == set(expected_multiplier)
    for path, m in expected_multiplier.items():
        m = np.asarray(m).reshape((-1,) + (1,) * (flat[path].ndim - 1)) if np.ndim(m) else m
        want = np.asarray(flat[path]) - 0.1 * m * np.asarray(flat_grad[path])
        np.testing.assert_allclose(np.asarray(flat_new[path]), want, atol=1e-6, rtol=1e-5, err_msg=path)

    # Frozen parameters have no optimizer state at all (Adam's moments cover only the trainable ones).
    c.name = "adamw"
    tx, _ = optim.make(c, params, 10, 2)
    moments = [p for p in optim.paths(tx.init(params)) if "lm_head" in p or "mlp_norm" in p]
    assert moments == []


def test_remat_chunked_loss_and_bfloat16_compute():
    """Rematerialisation and the loss chunk size change memory, not results; bfloat16 compute keeps
    float32 master weights and lands near the float32 loss."""
    from jaxtune.models.layers import CallOptions

    model = _tiny_model()
    batch = _batch(np.random.RandomState(2))
    c = defaults().optimizer
    c.name, c.lr, c.schedule = "sgd", 0.5, "constant"

    def one_step(remat="none", chunk=1024, compute=jnp.float32):
        graphdef, state = nnx.split(model)
        params = nnx.to_pure_dict(state)
        tx, lr = optim.make(c, params, 10, 2)
        step = steps.make_train_step(
            graphdef,
            tx,
            lr,
            compute_dtype=compute,
            accum_steps=1,
            chunk_tokens=chunk,
            options=CallOptions(remat=remat),
        )
        return jax.jit(step)(_state(tx, params), {}, batch)

    base_state, base = one_step()
    for kwargs in (dict(remat="full"), dict(remat="dots"), dict(chunk=7)):
        state, m = one_step(**kwargs)
        np.testing.assert_allclose(float(m["loss"]), float(base["loss"]), atol=1e-6, err_msg=str(kwargs))
        for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(base_state["params"]), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, err_msg=str(kwargs))
    state, m = one_step(compute=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(state["params"])} == {jnp.dtype(jnp.float32)}
    assert abs(float(m["loss"]) - float(base["loss"])) < 2e-2
    assert float(m["loss"]) != float(base["loss"])  # it did compute in bfloat16


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine", "wsd", "inverse_sqrt"])
def test_schedules_warm_up_then_follow_their_shape(schedule):
    c = defaults().optimizer
    c.lr, c.schedule, c.warmup_steps, c.min_lr_ratio = 1.0, schedule, 10, 0.1
    lr = optim.schedule(c, 110)
    values = np.array([float(lr(s)) for s in range(111)])
    np.testing.assert_allclose(values[:11], np.linspace(0, 1, 11), atol=1e-6)
    if schedule == "constant":
        assert np.allclose(values[10:], 1.0)
    elif schedule == "inverse_sqrt":
        np.testing.assert_allclose(values[40], np.sqrt(10 / 40), rtol=1e-5)
    else:
        assert abs(values[110] - 0.1) < 1e-5 and np.all(np.diff(values[10:]) <= 1e-7)
    if schedule == "wsd":
        assert np.allclose(values[10:90], 1.0) and values[100] < 1.0


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion", "sgd"])
def test_every_optimizer_lowers_the_loss(name, text_file, tmp_path):
    config = tiny_config(
        text_file, **{"optimizer.name": name, "train.max_steps": 8, "optimizer.momentum": 0.9}
    )
    if name in ("sgd", "adafactor"):
        config.optimizer.lr = 0.3 if name == "sgd" else 1e-2
    train.run(config, str(tmp_path))
    got = losses(tmp_path)
    assert got[8] < got[1] - 0.1, got


def test_train_and_eval_steps_compile_once(text_file, tmp_path, caplog):
    config = tiny_config(
        text_file, **{"train.max_steps": 6, "eval.every_steps": 2, "checkpoint.every_steps": 3}
    )
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING):
            train.run(config, str(tmp_path))
    finally:
        jax.config.update("jax_log_compiles", False)
    compiles = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling ")]
    assert sum(m.startswith("Compiling jit(train_step)") for m in compiles) == 1, compiles
    assert sum(m.startswith("Compiling jit(eval_step)") for m in compiles) == 1, compiles
    assert len(metrics(tmp_path, "eval")) == 3  # steps 2 and 4, and the end


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_continues_exactly_like_an_uninterrupted_run(dropout, text_file, tmp_path):
    """Dropout masks come from the seed and the step: a resumed run draws the ones it would have."""
    config = tiny_config(
        text_file, **{"train.max_steps": 20, "checkpoint.every_steps": 7, "model.dropout": dropout}
    )
    train.run(config, str(tmp_path / "straight"))
    first = train.run(config, str(tmp_path / "resumed"), stop_after=10)
    assert first["step"] == 10
    assert checkpoint.Checkpoints(str(tmp_path / "resumed")).latest() == 10
    train.run(config, str(tmp_path / "resumed"))
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 21))
    np.testing.assert_array_equal([resumed[s] for s in range(1, 21)], [straight[s] for s in range(1, 21)])
    a = checkpoint.restore_model(str(tmp_path / "straight"))[0]
    b = checkpoint.restore_model(str(tmp_path / "resumed"))[0]
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_dropout_changes_training_not_evaluation(text_file, tmp_path):
    runs = {}
    for rate in (0.0, 0.1):
        config = tiny_config(
            text_file, **{"train.max_steps": 3, "eval.at_start": True, "model.dropout": rate}
        )
        train.run(config, str(tmp_path / str(rate)))
        runs[rate] = (losses(tmp_path / str(rate)), metrics(tmp_path / str(rate), "eval"))
    (plain, plain_eval), (dropped, dropped_eval) = runs[0.0], runs[0.1]
    assert plain_eval[0]["step"] == dropped_eval[0]["step"] == 0
    assert plain_eval[0]["loss"] == dropped_eval[0]["loss"]  # eval never drops
    assert plain[1] != dropped[1]  # the first step's loss is computed with dropout


def test_half_written_checkpoint_is_ignored_with_a_warning(text_file, tmp_path, caplog):
    config = tiny_config(text_file, **{"train.max_steps": 6, "checkpoint.every_steps": 2})
    train.run(config, str(tmp_path), stop_after=4)
    ckpts = tmp_path / "checkpoints"
    # What a kill during a save leaves: Orbax's temporary directory, never renamed to its step.
    (ckpts / "6.orbax-checkpoint-tmp-1234567").mkdir()
    (ckpts / "6.orbax-checkpoint-tmp-1234567" / "params").mkdir()
    with caplog.at_level(logging.WARNING):
        summary = train.run(config, str(tmp_path))
    assert "half-written" in caplog.text and "6.orbax-checkpoint-tmp-1234567" in caplog.text
    assert summary["step"] == 6 and sorted(losses(tmp_path)) == [1, 2, 3, 4, 5, 6]


def test_eval_time_is_no_steps_time(text_file, tmp_path, monkeypatch):
    """Tokens/s and MFU are per step: an eval (made slow here) is counted in no step's time, and the
    step before it is not reported with a near-zero time."""
    from jaxtune.writers import MetricsWriter

    write = MetricsWriter.write

    def slow_eval(self, step, split, **values):
        if split == "eval":
            time.sleep(2.0)
        return write(self, step, split, **values)

    monkeypatch.setattr(MetricsWriter, "write", slow_eval)
    config = tiny_config(text_file, **{"train.max_steps": 12, "eval.every_steps": 4, "train.log_every": 1})
    train.run(config, str(tmp_path))
    tps = {r["step"]: r["tokens_per_second"] for r in metrics(tmp_path)}
    typical = float(np.median([tps[s] for s in range(2, 13)]))
    tokens = 8 * 32
    assert tokens / typical < 0.5  # a step takes far less than the eval's 2 s
    for step in (4, 5, 8, 9):  # at an eval, and just after it
        assert typical / 20 < tps[step] < typical * 20, (step, tps[step], typical)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(text_file, tmp_path):
    config = tiny_config(
        text_file, **{"train.max_steps": 30, "checkpoint.every_steps": 1, "optimizer.lr": 1e30}
    )
    config.optimizer.name = "sgd"  # Adam would normalise even this step size away
    config.optimizer.clip_norm = 0.0
    config.optimizer.warmup_steps = 0
    with pytest.raises(train.TrainingError) as e:
        train.run(config, str(tmp_path))
    msg = str(e.value)
    assert "at step " in msg and ("loss is nan" in msg or "parameters are not finite" in msg), msg
    good = checkpoint.Checkpoints(str(tmp_path)).latest()
    assert f"last good checkpoint is step {good}" in msg
    model, _ = checkpoint.restore_model(str(tmp_path))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model)))


def test_metrics_jsonl_schema_and_tensorboard_files(text_file, tmp_path):
    train.run(tiny_config(text_file, **{"eval.at_start": True}), str(tmp_path))
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for row in rows:
        assert set(row) >= {"step", "split", "loss", "learning_rate", "tokens_per_second", "mfu"}
        assert all(isinstance(row[k], float) for k in ("loss", "learning_rate", "tokens_per_second", "mfu"))
        assert row["tokens_per_second"] > 0 and 0 < row["mfu"] < 1
    evals = metrics(tmp_path, "eval")
    assert [r["step"] for r in evals] == [0, 5] and all({"loss", "perplexity"} <= set(r) for r in evals)
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["path"] == "llama-tiny" and saved["train"]["max_steps"] == 5


def test_export_from_a_checkpoint(text_file, tmp_path):
    import torch
    import transformers

    from jaxtune import export

    train.run(tiny_config(text_file), str(tmp_path / "run"))
    assert (
        export.main(
            ["--checkpoint", str(tmp_path / "run" / "checkpoints" / "5"), "--out", str(tmp_path / "hf")]
        )
        == 0
    )
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    model, tokenizer = checkpoint.restore_model(str(tmp_path / "run"))
    ids = np.array([tokenizer("the quick brown fox")["input_ids"]])
    with torch.no_grad():
        want = back(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(ids)), want, atol=1e-4, rtol=0)
    assert export.main(["--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2


def test_sigterm_saves_and_exits_zero_then_the_run_resumes(text_file, tmp_path):
    workdir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "jaxtune.train",
        "--config",
        os.path.join(os.path.dirname(__file__), "..", "configs", "smoke.py"),
        "--workdir",
        str(workdir),
        f"--config.data.train={text_file}",
        "--config.train.max_steps=100000",
        "--config.checkpoint.every_steps=0",
        "--config.eval.every_steps=0",
    ]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (workdir / "metrics.jsonl").exists() and len(metrics(workdir)) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM" in out
    if hostmem._glibc() is not None:  # jaxtune.hostmem keeps a CPU step's memory with glibc's malloc
        assert "working memory stays in the process" in out
    done = max(losses(workdir))
    assert checkpoint.Checkpoints(str(workdir)).latest() == done
    # The continuation: same config, same workdir; it picks up at the saved step.
    import importlib.util

    spec = importlib.util.spec_from_file_location("smoke", cmd[4])
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    config = smoke.get_config()
    with config.unlocked():
        config.data.train = text_file
        config.train.max_steps = 100000
        config.eval.every_steps = 0
    summary = train.run(config, str(workdir), stop_after=done + 2, devices=jax.devices()[:1])
    assert summary["step"] == done + 2
    assert sorted(losses(workdir))[-3:] == [done, done + 1, done + 2]


def test_every_config_in_configs_validates():
    import importlib.util
    import pathlib

    files = sorted(pathlib.Path(__file__).resolve().parents[1].glob("configs/*.py"))
    assert {f.stem for f in files} >= {"smoke", "quickstart"}
    for path in files:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert "python -m jaxtune.train --config configs/" + path.name in module.__doc__, path
        config = module.get_config()
        if not config.data.train:  # a generic config: the data come from the command line
            with pytest.raises(ConfigError, match="data.train is empty"):
                validate(config)
            config.data.train = "train.jsonl"
        validate(config)


@pytest.mark.parametrize(
    "changes,words",
    [
        ({"optimizer.lrr": 1e-3}, ["optimizer.lrr", "unknown", "optimizer.lr"]),
        ({"train.batch_size": "8"}, ["train.batch_size", "'8'", "int"]),
        ({"mesh.data": 3}, ["mesh data=3", "8 are available", "-1"]),
        ({"mesh.data": -1, "mesh.fsdp": -1}, ["mesh.data", "mesh.fsdp", "at most one"]),
        ({"train.batch_size": 12}, ["12", "8 data shards", "multiple of 8"]),
        ({"train.batch_size": 16, "train.grad_accum_steps": 3}, ["16", "grad_accum_steps = 3"]),
        ({"optimizer.name": "adam"}, ["optimizer.name", "'adam'", "adamw"]),
        ({"optimizer.schedule": "cosin"}, ["'cosin'", "cosine"]),
        ({"optimizer.frozen": ("(",)}, ["optimizer.frozen", "not a regular expression"]),
        ({"optimizer.lr_multipliers": (("embed",),)}, ["lr_multipliers[0]", "(regex, multiplier)"]),
        ({"model.compute_dtype": "fp8"}, ["model.compute_dtype", "'fp8'", "bfloat16"]),
        ({"data.train": ""}, ["data.train", "empty"]),
        ({"optimizer.warmup_ratio": 1.5}, ["optimizer.warmup_ratio", "1.5", "[0, 1)"]),
        ({"export.checkpoint": "first"}, ["export.checkpoint", "'first'", "'best'", "'last'"]),
        ({"model.problem_type": "ordinal"}, ["model.problem_type", "'ordinal'", "regression"]),
        ({"eval.metrics": "accuracy"}, ["eval.metrics", "applies to classifiers"]),
        (
            {
                "model.task": "sequence_classification",
                "data.format": "classification",
                "eval.metrics": "nope",
            },
            ["eval.metrics", "'nope'", "package.module:function"],
        ),
        (
            {
                "model.task": "sequence_classification",
                "data.format": "classification",
                "eval.metrics": "no_mod:f",
            },
            ["eval.metrics", "'no_mod:f'", "cannot be imported"],
        ),
    ],
)
def test_bad_configs_give_one_line_errors(text_file, changes, words):
    import ml_collections

    raw = tiny_config(text_file).to_dict()
    for key, value in changes.items():  # as a hand-written config file might have them
        section, leaf = key.split(".")
        raw[section][leaf] = value
    with pytest.raises(ConfigError) as e:
        validate(ml_collections.ConfigDict(raw), 8)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_cli_reports_config_errors_in_one_line(text_file, tmp_path, capsys):
    smoke = os.path.join(os.path.dirname(__file__), "..", "configs", "smoke.py")
    assert train.main(["--config", smoke, "--workdir", str(tmp_path), "--config.optimizer.lrr=1"]) == 2
    assert "config key optimizer.lrr is unknown; did you mean optimizer.lr?" in capsys.readouterr().err
    assert train.main(["--config", "configs/nope.py", "--workdir", str(tmp_path)]) == 2
    assert "'configs/nope.py' does not exist" in capsys.readouterr().err
    assert train.main(["--config", smoke, "--workdir", str(tmp_path), "--config.train.batch_size=8x"]) == 2
    assert "batch_size" in capsys.readouterr().err
    args = ["--config", smoke, "--workdir", str(tmp_path), "--config.mesh.data=3"]
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "mesh data=3" in err


def test_a_checkpoint_that_cannot_fit_is_refused_in_one_line(text_file, tmp_path, capsys, monkeypatch):
    """A full disk is found before Orbax writes half a checkpoint; the CLI says so in one line."""
    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 1000)
    smoke = os.path.join(os.path.dirname(__file__), "..", "configs", "smoke.py")
    args = ["--config", smoke, "--workdir", str(tmp_path), f"--config.data.train={text_file}"]
    assert train.main(args + ["--config.train.max_steps=2", "--config.eval.every_steps=0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: no room for the checkpoint of step 2 in "), err
    need = re.search(r"it needs (\d+\.\d) MB, 0\.0 MB are free", err)
    assert need and float(need[1]) > 0 and "checkpoint.keep" in err
    assert not os.listdir(tmp_path / "checkpoints")  # nothing half-written


def test_a_full_disk_during_an_asynchronous_save_is_one_line():
    with pytest.raises(checkpoint.CheckpointError) as e:
        with checkpoint._disk_full_is_one_line("/w/checkpoints"):
            raise ValueError(
                'RESOURCE_EXHAUSTED: Failed writing "x": No space left on device [os_error_code=28]'
            )
    assert str(e.value).startswith("no room for a checkpoint in /w/checkpoints (No space left on device)")
    with pytest.raises(KeyError):  # any other error passes through as it was
        with checkpoint._disk_full_is_one_line("/w/checkpoints"):
            raise KeyError("params")


def minilm_classifier(train_file):
    """The defaults with all-MiniLM-L6-v2 as a sequence classifier of ``train_file``."""
    from jaxtune import assets

    c = defaults()
    c.model.path = assets.minilm()
    c.model.task = "sequence_classification"
    c.data.train = str(train_file)
    c.data.format = "classification"
    return c


def test_sequence_classification_training_learns_and_exports_its_labels(tmp_path):
    """A real encoder (all-MiniLM-L6-v2) fine-tuned on a small labelled file; the label map comes from
    the training split and travels into the checkpoint's config and the export."""
    import torch
    import transformers

    rng = np.random.RandomState(0)
    good, bad = ["great", "lovely", "superb", "fine"], ["awful", "dull", "poor", "bad"]
    rows = []
    for _ in range(240):
        pos = rng.rand() < 0.5
        word = rng.choice(good if pos else bad)
        rows.append(
            {
                "sentence": f"the film was {word} and the cast {rng.choice(['too', 'as well'])}",
                "label": "pos" if pos else "neg",
            }
        )
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    c = minilm_classifier(tmp_path / "train.jsonl")
    c.data.text_field = "sentence"
    c.data.eval_fraction = 0.2
    c.data.seq_len = 16
    c.train.batch_size = 16
    c.train.max_steps = 24
    c.optimizer.lr = 2e-4
    c.optimizer.warmup_steps = 2
    c.eval.at_start = True
    c.export.at_end = True
    train.run(c, str(tmp_path / "run"), devices=one_device())
    evals = metrics(tmp_path / "run", "eval")
    assert [e["step"] for e in evals] == [0, 24]
    assert evals[1]["accuracy"] >= 0.9 and evals[1]["accuracy"] > evals[0]["accuracy"] + 0.2, evals
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert {"f1_macro", "mcc", "precision/pos", "recall/neg"} <= set(evals[1])
    matrix = json.loads((tmp_path / "run" / "confusion_matrix.json").read_text())
    assert matrix["labels"] == ["neg", "pos"] and sum(map(sum, matrix["matrix"])) == 48  # the held-out 20%
    assert saved["id2label"] == {"0": "neg", "1": "pos"} and saved["architectures"] == [
        "BertForSequenceClassification"
    ]
    back = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "run" / "export", dtype=torch.float32
    )
    assert back.config.id2label == {0: "neg", 1: "pos"}
    tok = jaxtune.load_tokenizer(str(tmp_path / "run" / "export"))
    enc = tok(["the film was superb", "the film was awful"], padding=True, return_tensors="np")
    model, _ = checkpoint.restore_model(str(tmp_path / "run"))
    ours = np.asarray(model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]))
    with torch.no_grad():
        theirs = back(**{k: torch.tensor(v) for k, v in enc.items()}).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert [back.config.id2label[i] for i in theirs.argmax(-1)] == ["pos", "neg"]


def test_best_k_checkpoints_keep_the_best_steps_and_load_at_end(text_file, tmp_path):
    config = tiny_config(
        text_file,
        **{
            "train.max_steps": 12,
            "eval.every_steps": 2,
            "checkpoint.best_metric": "loss",
            "checkpoint.best_mode": "min",
            "checkpoint.best_keep": 2,
            "checkpoint.load_best_at_end": True,
            "optimizer.lr": 3e-2,  # high enough that the eval loss goes up and down
            "optimizer.schedule": "constant",
        },
    )
    summary = train.run(config, str(tmp_path))
    evals = {e["step"]: e["loss"] for e in metrics(tmp_path, "eval")}
    assert sorted(evals) == [2, 4, 6, 8, 10, 12]
    ranked = sorted(evals, key=evals.get)
    kept = sorted(int(p.name) for p in (tmp_path / "checkpoints_best").iterdir() if p.name.isdigit())
    assert kept == sorted(ranked[:2])
    record = json.loads((tmp_path / "checkpoints_best" / "best.json").read_text())
    assert record["step"] == ranked[0] and record["value"] == pytest.approx(evals[ranked[0]])
    if ranked[0] != 12:
        assert summary["best_step"] == ranked[0]
    # The export of a run with best checkpoints is the best one.
    best_model, _ = checkpoint.restore_model(str(tmp_path))
    last_model, _ = checkpoint.restore_model(str(tmp_path / "checkpoints" / "12"))
    same = all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(
            jax.tree.leaves(nnx.state(best_model)), jax.tree.leaves(nnx.state(last_model)), strict=True
        )
    )
    assert same == (ranked[0] == 12)


def test_early_stopping_ends_the_run_after_patience_evals_without_gain(text_file, tmp_path):
    config = tiny_config(
        text_file,
        **{
            "train.max_steps": 40,
            "eval.every_steps": 2,
            "eval.at_start": True,
            "eval.patience": 2,
            "eval.min_delta": 1e-3,
            "checkpoint.best_metric": "loss",
            "checkpoint.best_mode": "min",
            "optimizer.lr": 1e-12,  # nothing moves: no eval can gain min_delta
        },
    )
    summary = train.run(config, str(tmp_path))
    assert summary["step"] == 4
    assert [e["step"] for e in metrics(tmp_path, "eval")] == [0, 2, 4]
    assert checkpoint.Checkpoints(str(tmp_path)).latest() == 4
    with pytest.raises(ConfigError, match="checkpoint.best_metric"):
        validate(tiny_config(text_file, **{"eval.patience": 2}))


def test_warmup_ratio_with_linear_decay_is_trainers_schedule_step_for_step():
    import torch
    import transformers

    c = defaults().optimizer
    c.lr, c.schedule, c.warmup_ratio = 1e-4, "linear", 0.1
    ours = optim.schedule(c, 500)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    theirs = transformers.get_linear_schedule_with_warmup(opt, 50, 500)  # ceil(0.1 * 500) warmup steps
    for step in range(500):
        assert float(ours(step)) == pytest.approx(theirs.get_last_lr()[0], rel=1e-5, abs=1e-12), step
        opt.step()
        theirs.step()


@pytest.mark.parametrize("kind", ["regression", "multi_label_classification"])
def test_regression_and_multi_label_classifiers_train_and_report_their_metrics(kind, tmp_path):
    """Scores (non-integer numbers) train a regression head, lists of labels a multi-label one; the
    problem type comes from the training labels and travels into the export."""
    import torch
    import transformers

    from jaxtune import evaluate
    from jaxtune.data import sources

    rng = np.random.RandomState(1)
    score = {"superb": 0.95, "great": 0.8, "fine": 0.55, "dull": 0.25, "awful": 0.05}
    rows = []
    for _ in range(200):
        word, music = rng.choice(list(score)), rng.rand() < 0.5
        text = f"the acting was {word}" + (" and the music loud" if music else "")
        tags = (["good"] if score[word] > 0.5 else []) + (["music"] if music else [])
        rows.append({"text": text, "label": score[word] if kind == "regression" else tags})
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:160]))
    (tmp_path / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in rows[160:]))
    c = minilm_classifier(tmp_path / "train.jsonl")
    c.data.eval = str(tmp_path / "dev.jsonl")
    c.data.seq_len = 16
    c.train.batch_size = 16
    c.train.max_steps = 30
    c.optimizer.lr = 3e-4
    c.optimizer.warmup_steps = 3
    c.eval.at_start = True
    c.eval.batch_size = 24  # 40 dev rows: the last batch is padded, and the padding must not count
    c.export.at_end = True
    train.run(c, str(tmp_path / "run"), devices=one_device())
    before, after = metrics(tmp_path / "run", "eval")
    saved = json.loads((tmp_path / "run" / "export" / "config.json").read_text())
    assert saved["problem_type"] == kind
    scored = evaluate.evaluate(
        *checkpoint.restore_model(str(tmp_path / "run")),
        sources.read(str(tmp_path / "dev.jsonl")),
    )
    if kind == "regression":
        assert set(after) >= {"mse", "pearson", "spearman"} and len(saved["id2label"]) == 1
        assert after["pearson"] > 0.9 and after["mse"] < before["mse"] / 4, (before, after)
        # The eval loss is the mean squared error over the 40 real rows, padding left out.
        assert after["loss"] == pytest.approx(after["mse"], rel=1e-4)
        assert scored["mse"] == pytest.approx(after["mse"], rel=1e-3)
    else:
        assert saved["id2label"] == {"0": "good", "1": "music"}
        assert after["exact_match"] >= 0.9 and after["exact_match"] > before["exact_match"], (before, after)
        assert scored["exact_match"] == pytest.approx(after["exact_match"])
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "export")
    assert back.config.problem_type == kind
    enc = jaxtune.load_tokenizer(str(tmp_path / "run" / "export"))(
        ["the acting was superb"], return_tensors="pt"
    )
    with torch.no_grad():
        theirs = back(**enc).logits.numpy()
    model, _ = checkpoint.restore_model(str(tmp_path / "run"))
    ours = np.asarray(
        model(enc["input_ids"].numpy(), enc["attention_mask"].numpy(), enc["token_type_ids"].numpy())
    )
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_batches_cut_to_their_longest_row_train_like_full_rows(tmp_path, caplog):
    """data.pad_to_multiple_of: each batch is cut to its longest row rounded up to 8 tokens; losses and
    eval metrics equal those of full seq_len rows, and the step compiles once per length."""
    from jaxtune import assets, data
    from jaxtune.data.classify import label_map
    from jaxtune.data.loader import Batches

    rng = np.random.RandomState(3)
    words = ["good", "bad", "plot", "cast", "music", "long", "very", "the", "film", "and"]
    # Mostly short texts, one in ten long: batches with a long one need 32 tokens, others 8.
    sizes = [25 if rng.rand() < 0.1 else rng.randint(1, 6) for _ in range(96)]
    rows = [{"text": " ".join(rng.choice(words, size=n)), "label": str(rng.randint(2))} for n in sizes]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    c = minilm_classifier(tmp_path / "train.jsonl")
    c.data.eval_fraction = 0.25
    c.data.seq_len = 32
    c.train.batch_size = 8
    c.train.max_steps = 6
    c.optimizer.lr = 1e-4
    c.eval.batch_size = 8
    train.run(c, str(tmp_path / "full"), devices=one_device())
    c.data.pad_to_multiple_of = 8
    caplog.clear()  # only the second run's compilations
    with caplog.at_level(logging.INFO, logger="jaxtune.train"):
        train.run(c, str(tmp_path / "cut"), devices=one_device())
    cut_losses, full_losses = losses(tmp_path / "cut"), losses(tmp_path / "full")
    assert sorted(cut_losses) == sorted(full_losses) == list(range(1, 7))
    np.testing.assert_allclose(list(cut_losses.values()), list(full_losses.values()), atol=1e-5)
    (full,), (cut,) = metrics(tmp_path / "full", "eval"), metrics(tmp_path / "cut", "eval")
    assert cut["accuracy"] == full["accuracy"] and cut["loss"] == pytest.approx(full["loss"], abs=1e-5)
    # The lengths the run's batches had: every one a multiple of 8, more than one of them.
    labels = label_map([(r, "x") for r in rows])
    train_rows, _ = data.load(c.data, jaxtune.load_tokenizer(assets.minilm()), 0, labels)
    batches = Batches(train_rows, 8, 0, pad_to_multiple_of=8)
    lengths = {next(batches)["input_ids"].shape[1] for _ in range(6)}
    assert len(lengths) > 1 and all(n % 8 == 0 and n <= 32 for n in lengths), lengths
    compiled = [r.getMessage() for r in caplog.records if "train step compiled" in r.getMessage()]
    assert sorted(int(m.split("rows of ")[1].split()[0]) for m in compiled) == sorted(lengths)


def test_prepared_shards_train_like_memory_and_streaming_resumes_exactly(text_file, tmp_path):
    """A run from prepared shards sees the in-memory run's rows in its order (equal losses, eval
    included); streaming runs resume with the batches an uninterrupted one sees."""
    from jaxtune.prepare import prepare

    config = tiny_config(text_file, **{"train.max_steps": 6, "eval.every_steps": 3})
    train.run(config, str(tmp_path / "memory"))
    index = prepare(config, str(tmp_path / "rows"), workers=1, progress=False)
    assert index["eval"]["rows"] > 0
    prepared = tiny_config(
        text_file,
        **{"train.max_steps": 6, "eval.every_steps": 3, "data.train": f"prepared:{tmp_path / 'rows'}"},
    )
    prepared.data.eval_fraction = 0.0
    train.run(prepared, str(tmp_path / "prepared"))
    assert losses(tmp_path / "prepared") == losses(tmp_path / "memory")
    assert metrics(tmp_path / "prepared", "eval") == metrics(tmp_path / "memory", "eval")
    streaming = tiny_config(
        text_file,
        **{
            "train.max_steps": 8,
            "checkpoint.every_steps": 3,
            "data.streaming": True,
            "data.eval_fraction": 0.0,
        },
    )
    train.run(streaming, str(tmp_path / "straight"))
    assert train.run(streaming, str(tmp_path / "resumed"), stop_after=5)["step"] == 5
    train.run(streaming, str(tmp_path / "resumed"))
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 9)) and resumed == straight
