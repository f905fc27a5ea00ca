"""gs:// workdirs end to end, against a local Cloud Storage emulator (gcp-storage-emulator): a run
writes its metrics, TensorBoard events, config, model files, checkpoints, best-k record and export
into the bucket, resumes from it with the losses of an uninterrupted local run, and exports from it."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from runs import losses, tiny_config

BUCKET = "jaxtune-test"
# Cloud Storage names an object's generation in a download's x-goog-generation header, which
# TensorStore reads for its conditional writes (OCDBT's manifest); the emulator leaves it out, so the
# server below adds it.
SERVER = """
import sys, time
from gcp_storage_emulator.handlers import objects
from gcp_storage_emulator.server import create_server

plain = objects.download

def download(request, response, storage, *args, **kwargs):
    plain(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:
        return
    response["x-goog-generation"] = obj["generation"]
    response["x-goog-metageneration"] = obj["metageneration"]

objects.download = download
server = create_server("127.0.0.1", int(sys.argv[1]), in_memory=True, default_bucket=sys.argv[2])
server.start()
while True:
    time.sleep(3600)
"""


@pytest.fixture(scope="module")
def bucket():
    """gs://BUCKET on an emulator in its own process; the clients of gcsfs (epath) and TensorStore
    (Orbax's arrays) pointed at it for the rest of this process (TensorStore reads its URL once)."""
    pytest.importorskip("gcsfs", reason="gs:// needs gcsfs (pip install -e '.[test]')")
    pytest.importorskip("gcp_storage_emulator", reason="the emulator is in the test extra")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port), BUCKET], stdout=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:  # up once it answers a bucket listing
            assert server.poll() is None, "the storage emulator exited"
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, f"the storage emulator did not answer on {url}"
                time.sleep(0.1)
        env = {
            "STORAGE_EMULATOR_HOST": url,
            "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
        }
        before = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        yield f"gs://{BUCKET}"
    finally:
        server.kill()
        server.wait()
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _read(url: str) -> str:
    from jaxtune import fs

    return fs.read_text(url)


def _losses(text: str) -> dict:
    rows = [json.loads(line) for line in text.splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def test_a_gs_workdir_trains_resumes_and_exports_like_a_local_one(bucket, text_file, tmp_path):
    from safetensors.numpy import load_file

    from jaxtune import export, fs, train

    changes = {
        "train.max_steps": 6,
        "checkpoint.every_steps": 2,
        "eval.every_steps": 3,
        "checkpoint.best_metric": "loss",
        "checkpoint.best_mode": "min",
        "export.at_end": True,
    }
    local = tmp_path / "local"
    train.run(tiny_config(text_file, **changes), str(local))

    run = f"{bucket}/runs/tiny"
    first = train.run(tiny_config(text_file, **changes), run, stop_after=3)
    assert first["step"] == 3
    assert sorted(int(n) for n in fs.listdir(f"{run}/checkpoints") if n.isdigit()) == [2, 3]
    # A row of a step the stopped run reached after its last save, which the resumed run redoes.
    fs.write_text(
        f"{run}/metrics.jsonl",
        _read(f"{run}/metrics.jsonl") + '{"step": 4, "split": "train", "loss": 99.0}\n',
    )
    resumed = train.run(tiny_config(text_file, **changes), run)
    assert resumed["step"] == 6

    # One row per step after the resume, and the uninterrupted local run's losses.
    text = _read(f"{run}/metrics.jsonl")
    steps = [json.loads(line)["step"] for line in text.splitlines() if '"train"' in line]
    assert steps == sorted(set(steps))
    assert _losses(text) == pytest.approx(losses(local), rel=1e-6)
    assert json.loads(_read(f"{run}/config.json"))["train"]["max_steps"] == 6
    assert json.loads(_read(f"{run}/model/config.json"))["model_type"] == "llama"
    assert any(n.startswith("events.out.tfevents") for n in fs.listdir(run))
    best = json.loads(_read(f"{run}/checkpoints_best/best.json"))
    assert best["metric"] == "loss" and best["step"] in (3, 6)
    assert sorted(int(n) for n in fs.listdir(f"{run}/checkpoints") if n.isdigit()) == [3, 4, 6]  # keep 3

    # The export at the end of the run, and one from the bucket's checkpoint into the bucket.
    mine = load_file(local / "export" / "model.safetensors")
    with fs.fetched(f"{run}/export") as got:
        theirs = load_file(os.path.join(got, "model.safetensors"))
        assert os.path.exists(os.path.join(got, "config.json"))
    assert mine.keys() == theirs.keys()
    for key in mine:
        np.testing.assert_allclose(theirs[key], mine[key], rtol=1e-6, atol=1e-7, err_msg=key)
    assert export.main(["--checkpoint", run, "--out", f"{bucket}/exported"]) == 0
    with fs.fetched(f"{bucket}/exported") as got:
        again = load_file(os.path.join(got, "model.safetensors"))
    for key in mine:
        np.testing.assert_array_equal(again[key], theirs[key], err_msg=key)


def test_gs_paths_without_gcsfs_are_one_line(monkeypatch):
    import importlib.util

    from jaxtune import fs
    from jaxtune.errors import UsageError

    real = importlib.util.find_spec
    absent = {"gcsfs", "tensorflow"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in absent else real(n, *a))
    with pytest.raises(UsageError, match=r"gs://b/run: gs:// paths need gcsfs; pip install 'jaxtune\[gcs\]'"):
        fs.exists("gs://b/run")
