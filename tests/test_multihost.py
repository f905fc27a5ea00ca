"""Multi-process runs on one machine, as the hosts of a pod run: 2 processes x 4 CPU devices form one
JAX runtime (gloo collectives, the coordinator on 127.0.0.1), train with FSDP over all 8 devices, and
save one checkpoint together; it resumes on 1 process x 8 devices and 1 x 2."""

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from runs import losses, metrics

from jaxtune import checkpoint, cli, train

SMOKE = os.path.join(os.path.dirname(__file__), "..", "configs", "smoke.py")
STEPS = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(text_file, *extra):
    return [
        f"--config.data.train={text_file}",
        "--config.mesh.data=1",
        "--config.mesh.fsdp=-1",  # FSDP over every device of both processes
        *extra,
    ]


def _launch(workdir, overrides):
    """Two training processes of one run: process 0 takes the runtime from flags, process 1 from the
    JAXTUNE_* environment variables."""
    port = _free_port()
    procs = []
    for i in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
        flags = []
        if i == 0:
            flags = ["--coordinator", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", "0"]
        else:
            env.update(
                JAXTUNE_COORDINATOR=f"127.0.0.1:{port}", JAXTUNE_NUM_PROCESSES="2", JAXTUNE_PROCESS_ID="1"
            )
        cmd = [sys.executable, "-m", "jaxtune.train", "--config", SMOKE, "--workdir", str(workdir)]
        procs.append(
            subprocess.Popen(
                cmd + flags + overrides, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    return procs


def _command_pair(command: str, *args):
    """``python -m jaxtune.COMMAND ARGS`` as the 2 processes (4 devices each) of one runtime."""
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = []
    for i in range(2):
        runtime = ["--coordinator", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i)]
        cmd = [sys.executable, "-m", f"jaxtune.{command}", *map(str, args), *runtime]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    return procs


def _finish(procs, timeout=300):
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out
    return outs


def _relative(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    return max(abs(a[k] - b[k]) / abs(b[k]) for k in a)


@pytest.fixture(scope="module")
def pair(text_file, tmp_path_factory):
    """A 2 x 4 run of 10 steps with checkpoints at 5 and 10, and the 1 x 8 run of the same config."""
    root = tmp_path_factory.mktemp("multihost")
    extra = [
        f"--config.train.max_steps={STEPS}",
        "--config.checkpoint.every_steps=5",
        "--config.eval.every_steps=5",
        "--config.export.at_end=true",
    ]
    overrides = _overrides(text_file, *extra)
    outs = _finish(_launch(root / "two", overrides))
    config = cli.load_config(SMOKE, overrides)
    train.run(config, str(root / "one"), devices=jax.devices()[:8])
    return root, config, outs


def test_two_processes_train_as_one_with_the_losses_of_one_process(pair):
    root, _, (out0, out1) = pair
    assert _relative(losses(root / "two"), losses(root / "one")) < 1e-5
    # Only process 0 writes the run's files and speaks: one metrics row per step, no bar on process 1.
    assert [row["step"] for row in metrics(root / "two")] == list(range(1, STEPS + 1))
    assert [row["step"] for row in metrics(root / "two", "eval")] == [5, 10]
    assert "eval at step 5" in out0 and "eval at step" not in out1 and "train:" not in out1
    assert "process 1 of 2: 4 local devices, 8 in all" in out1
    assert checkpoint.Checkpoints(str(root / "two")).latest() == STEPS
    # The export gathers each tensor from both processes; process 0 writes it.
    from safetensors.numpy import load_file

    two, one = (load_file(root / d / "export" / "model.safetensors") for d in ("two", "one"))
    assert sorted(two) == sorted(one)
    for key, value in one.items():
        np.testing.assert_allclose(two[key], value, rtol=1e-5, atol=1e-7)


def test_two_processes_export_a_checkpoint_as_one_process_does(pair, tmp_path):
    """``python -m jaxtune.export`` as 2 processes of one runtime: both take part, process 0 writes and
    reports, and the weights are those of a one-process export."""
    from safetensors.numpy import load_file

    root, _, _ = pair
    out0, out1 = _finish(
        _command_pair("export", "--checkpoint", root / "two", "--out", tmp_path / "out"), 240
    )
    assert f"wrote {tmp_path / 'out'}" in out0 and "wrote" not in out1
    assert "restoring sharded over the 8 devices of 2 processes" in out0  # no host holds the whole model
    from jaxtune import export

    assert export.main(["--checkpoint", str(root / "two"), "--out", str(tmp_path / "one")]) == 0
    two, one = (load_file(tmp_path / d / "model.safetensors") for d in ("out", "one"))
    assert sorted(two) == sorted(one) and all(np.array_equal(two[k], one[k]) for k in one)


def test_two_processes_evaluate_a_classifier_checkpoint_as_one_process_does(tmp_path, capsys):
    """``python -m jaxtune.evaluate --checkpoint`` as 2 processes: the checkpoint is restored sharded
    over both processes' devices, both compute, process 0 alone prints the table, and the metrics written
    are those of one process."""
    from runs import tiny_config, write_labelled

    from jaxtune import evaluate

    data = write_labelled(tmp_path / "d.jsonl", 40)
    changes = {
        "model.task": "sequence_classification",
        "data.format": "classification",
        "train.max_steps": 4,
        "optimizer.lr": 1e-2,
    }
    train.run(tiny_config(str(data), **changes), str(tmp_path / "run"))
    out = tmp_path / "two.json"
    procs = _command_pair("evaluate", "--checkpoint", tmp_path / "run", "--data", data, "--output", out)
    out0, out1 = _finish(procs, 240)
    assert "restoring sharded over the 8 devices of 2 processes" in out0
    assert "accuracy" in out0 and "accuracy" not in out1
    capsys.readouterr()
    assert (
        evaluate.main(
            [
                "--checkpoint",
                str(tmp_path / "run"),
                "--data",
                str(data),
                "--output",
                str(tmp_path / "one.json"),
            ]
        )
        == 0
    )
    two, one = (json.loads((tmp_path / n).read_text()) for n in ("two.json", "one.json"))
    assert two == one and two["accuracy"] > 0


@pytest.mark.parametrize("devices", [8, 2])
def test_a_two_process_checkpoint_resumes_on_other_device_counts(pair, devices, tmp_path):
    """The step-5 checkpoint of the 2 x 4 run, resharded onto 1 x 8 and 1 x 2, continues with the losses
    of the uninterrupted run."""
    root, config, _ = pair
    workdir = tmp_path / "resumed"
    shutil.copytree(root / "two", workdir)
    shutil.rmtree(workdir / "checkpoints" / str(STEPS))  # as if preempted after the step-5 save
    summary = train.run(config, str(workdir), devices=jax.devices()[:devices])
    assert summary["step"] == STEPS
    resumed = {k: v for k, v in losses(workdir).items() if k > 5}
    uninterrupted = {k: v for k, v in losses(root / "one").items() if k > 5}
    assert _relative(resumed, uninterrupted) < 1e-5
    assert [row["step"] for row in metrics(workdir)] == list(range(1, STEPS + 1))


def test_sigterm_to_one_process_makes_both_save_the_same_step_and_exit_zero(text_file, tmp_path):
    workdir = tmp_path / "run"
    extra = [
        "--config.train.max_steps=100000",
        "--config.checkpoint.every_steps=0",
        "--config.eval.every_steps=0",
    ]
    procs = _launch(workdir, _overrides(text_file, *extra))
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (
            (workdir / "metrics.jsonl").exists() and len(metrics(workdir)) >= 3
        ):
            assert all(p.poll() is None for p in procs), [p.communicate()[0] for p in procs]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)
    finally:
        out0, out1 = _finish(procs, timeout=240)
    assert "SIGTERM" in out1 and "stopped at step" in out0
    step = int(out0.split("stopped at step ")[1].split()[0])
    assert checkpoint.Checkpoints(str(workdir)).latest() == step == max(losses(workdir))
    assert np.isfinite(list(losses(workdir).values())).all()


def _held_bytes(value) -> int:
    """Bytes of the distinct blocks an array's devices hold (a replicated block counts once)."""
    blocks = {
        tuple(s.indices(d)[:2] for s, d in zip(index, value.shape, strict=True))
        for index in value.sharding.devices_indices_map(value.shape).values()
    }
    return sum(math.prod(stop - start for start, stop in b) for b in blocks) * value.dtype.itemsize


def test_loading_under_fsdp_reads_only_the_blocks_each_device_holds(tmp_path, monkeypatch):
    """Each device's block of a stacked [layers, ...] parameter is read from the checkpoint on its
    own (per layer, only the rows and columns it covers): the bytes read are those the devices hold,
    once, never a whole stacked tensor per device."""
    from flax import nnx

    import jaxtune
    from jaxtune import hf, pretrained, sharding
    from jaxtune.config import defaults
    from jaxtune.models import presets
    from jaxtune.plan import mesh_rules

    model_dir = tmp_path / "tiny"
    pretrained.save_pretrained(pretrained.model_from_config(presets.hf_config("llama-tiny")), str(model_dir))
    config = defaults()
    config.mesh.data, config.mesh.fsdp = 1, -1
    mesh, rules = sharding.make_mesh(config, jax.devices()[:8]), mesh_rules(config)
    reads = []
    read = hf.Tensors.read

    def counted(self, key, index):
        block = read(self, key, index)
        reads.append(block.nbytes)
        return block

    monkeypatch.setattr(hf.Tensors, "read", counted)
    sharded = jaxtune.load_pretrained(str(model_dir), mesh=mesh, rules=rules)
    values = [var.get_value() for _, var in nnx.to_flat_state(nnx.state(sharded, nnx.Param))]
    model_bytes = sum(v.nbytes for v in values)
    assert sum(reads) == sum(_held_bytes(v) for v in values)
    assert sum(reads) < 1.5 * model_bytes  # FSDP: nearly every byte is held, and read, once
    assert max(reads) <= max(v.nbytes for v in values) / 8  # one layer's block, not a stacked tensor
    plain = pretrained.model_state(jaxtune.load_pretrained(str(model_dir)))
    for path, value in pretrained.model_state(sharded).items():
        np.testing.assert_array_equal(value, plain[path])


def test_crossval_on_a_url_workdir_is_one_line(capsys):
    from jaxtune import crossval

    status = crossval.main(["--config", SMOKE, "--folds", "2", "--workdir", "gs://bucket/run"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2 and err.startswith("error: --workdir gs://bucket/run: cross-validation needs a local")


def test_which_environments_start_a_multi_process_runtime(monkeypatch):
    from jaxtune import distributed
    from jaxtune.errors import UsageError

    for key in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    for key in ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(distributed, "_on_tpu_vm", lambda: False)
    assert distributed._detected_cluster() is None
    monkeypatch.setenv("SLURM_NTASKS", "4")  # an sbatch script or an salloc shell: one process
    assert distributed._detected_cluster() is None
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")  # a task of an srun step
    assert distributed._detected_cluster() == "Slurm"
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2,10.0.0.3")
    assert distributed._detected_cluster() == "Cloud TPU"
    with pytest.raises(UsageError, match="--num_processes, --process_id missing"):
        distributed.initialize("127.0.0.1:1234")
    with pytest.raises(UsageError, match="--num_processes 0 must be at least 1"):
        distributed.initialize("127.0.0.1:1234", 0, 0)
    with pytest.raises(UsageError, match="--process_id 2 is not in 0 .. 1"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    assert distributed.initialize("127.0.0.1:1234", 1, 0) is False  # one process: nothing to join


def test_two_processes_stream_their_own_files_and_resume_exactly(tmp_path):
    """data.streaming on 2 processes: each reads its own file, both positions go into the checkpoint,
    and a resumed pair continues with the losses of a pair that never stopped."""
    from runs import TEXT

    lines = TEXT.splitlines(keepends=True)
    for i in range(2):
        (tmp_path / f"part{i}.txt").write_text("".join(lines[i::2]))
    common = [
        f"--config.data.train={tmp_path / 'part*.txt'}",
        "--config.data.streaming=True",
        "--config.data.eval_fraction=0.0",
        "--config.optimizer.schedule=constant",
        "--config.checkpoint.every_steps=3",
        "--config.checkpoint.async_save=False",
    ]
    _finish(_launch(tmp_path / "straight", [*common, "--config.train.max_steps=6"]))
    _finish(_launch(tmp_path / "resumed", [*common, "--config.train.max_steps=3"]))
    _finish(_launch(tmp_path / "resumed", [*common, "--config.train.max_steps=6"]))
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 7)) and resumed == straight
    with open(tmp_path / "straight" / "checkpoints" / "6" / "meta" / "metadata") as f:
        meta = json.load(f)  # Orbax's JSON item, as written
    states = meta["data"]["processes"]  # each process's own position, in its own file
    assert [[os.path.basename(f) for f, _ in s["files"]] for s in states] == [["part0.txt"], ["part1.txt"]]
