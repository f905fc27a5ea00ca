"""``python -m jaxtune.plan``: the real train step compiled for a TPU topology on this CPU machine
(jax[tpu]'s compiler), the memory per device against the chip's HBM, and the exit status."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from jaxtune import plan, topology
from jaxtune.errors import UsageError

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _tpu_compiler():
    # Skipped only where libtpu is absent: a compiler that is installed but refuses (another process
    # holding libtpu's lock, a broken install) fails the test rather than hiding behind a skip.
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("the TPU compiler is not installed (pip install -e '.[tpu]')")
    topology.devices(topology.parse("v5p-8"))


def _plan(capsys, *argv):
    status = plan.main(["--json", *argv])
    out, err = capsys.readouterr()
    return status, (json.loads(out) if out.strip() else None), err


@pytest.mark.parametrize(
    "name,chips,hosts,hbm_gib",
    [
        ("v5p-8", 4, 1, 95),
        ("v5p-64", 32, 8, 95),
        ("v5p-256", 128, 32, 95),
        ("v6e-8", 8, 1, 32),
        ("v6e-256", 256, 64, 32),
        ("v5litepod-16", 16, 4, 16),
        ("v5e-4", 4, 1, 16),
        ("v4-32", 16, 4, 32),
        ("v5p:2x2x4", 16, 4, 95),
    ],
)
def test_cloud_tpu_names_mean_their_chips_and_hosts(name, chips, hosts, hbm_gib):
    s = topology.parse(name)
    assert (s.chips, s.hosts, s.hbm_bytes) == (chips, hosts, hbm_gib << 30)


def test_a_name_that_is_no_slice_is_one_line():
    with pytest.raises(UsageError, match="unknown topology 'v9x-8'"):
        topology.parse("v9x-8")
    with pytest.raises(UsageError, match="not a standard slice; use one of v5p-8, v5p-16"):
        topology.parse("v5p-24")


def _tpu_friendly_llama(tmp_path) -> str:
    """A small Llama whose widths are multiples of 128, so the TPU's tiled layouts add no padding and
    the arguments are exactly the state's bytes."""
    d = tmp_path / "llama-512"
    d.mkdir()
    config = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=1024,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    (d / "config.json").write_text(json.dumps(config))
    return str(d)


@pytest.mark.e2e
def test_arguments_per_device_are_the_sharded_state(tmp_path, capsys):
    _tpu_compiler()
    model = _tpu_friendly_llama(tmp_path)
    smoke = os.path.join(CONFIGS, "smoke.py")
    status, got, _ = _plan(
        capsys,
        "--config",
        smoke,
        "--topology",
        "v5p-8",
        f"--config.model.path={model}",
        "--config.model.tokenizer=bytes",
        "--config.mesh.data=1",
        "--config.mesh.fsdp=-1",
    )
    assert status == 0 and got["fits"] and got["devices"] == 4 and got["mesh"]["fsdp"] == 4
    # float32 parameters and AdamW's two moments, divided over the 4 FSDP shards.
    expected = got["parameters"] * 4 * 3 / 4
    assert abs(got["per_device_bytes"]["arguments"] - expected) < 0.1 * expected
    assert got["hbm_bytes_per_device"] == 95 << 30 and got["flops_per_step"] > 0
    assert {"arguments", "outputs", "temporaries", "total"} <= set(got["per_device_bytes"])
    seconds = got["at_mfu"]["40%"]["step_seconds"]
    assert seconds == pytest.approx(got["flops_per_step"] / (0.4 * got["peak_flops_per_device"] * 4))


def test_a_70b_full_fine_tune_does_not_fit_four_v5e_chips_and_says_why(capsys):
    _tpu_compiler()
    config = os.path.join(CONFIGS, "llama3_70b.py")
    status, got, err = _plan(
        capsys,
        "--config",
        config,
        "--topology",
        "v5e-4",
        "--config.model.path=llama3-70b",
        "--config.mesh.data=1",
        "--config.mesh.fsdp=-1",
        "--config.mesh.tensor=1",
    )
    assert status == 1 and not got["fits"]
    assert got["per_device_bytes"]["arguments"] > 16 << 30  # 70B x 12 bytes / 4 chips: about 200 GiB
    line = err.strip().splitlines()[-1]
    assert (
        line.startswith("error: the step does not fit v5e-4") and "GiB a device, 16.0 GiB available" in line
    )
    assert "largest part is arguments" in line and "mesh.fsdp" in line


@pytest.mark.e2e
def test_cpu_devices_plan_without_the_tpu_compiler(tmp_path):
    """``cpu:N`` never starts the TPU runtime (with jax[tpu] installed, as here, it would announce
    itself on stderr), so it needs no jax[tpu]."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_PLATFORMS", None)
    smoke = os.path.join(CONFIGS, "smoke.py")
    cmd = [sys.executable, "-m", "jaxtune.plan", "--config", smoke, "--topology", "cpu:8", "--json"]
    out = subprocess.run(
        cmd + ["--config.mesh.data=1", "--config.mesh.fsdp=-1"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["devices"] == 8 and got["device_kind"] == "cpu" and got["fits"] and got["mesh"]["fsdp"] == 8
    assert "libtpu" not in out.stderr and "TPU_WORKER_HOSTNAMES" not in out.stderr


@pytest.mark.e2e
@pytest.mark.slow
def test_the_llama3_8b_config_fits_a_v5p_32(capsys):
    """The pod config as shipped, planned for the slice its docstring names (compiling the 8B step
    for 16 chips takes about a minute here)."""
    _tpu_compiler()
    config = os.path.join(CONFIGS, "llama3_8b.py")
    status, got, err = _plan(
        capsys, "--config", config, "--topology", "v5p-32", "--config.model.path=llama3-8b"
    )
    assert status == 0, err
    assert got["fits"] and got["devices"] == 16 and got["measured"] == "compiled"
    assert 7.9e9 < got["parameters"] < 8.1e9
