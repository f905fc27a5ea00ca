"""Test set-up: 8 host CPU devices (set before jax is imported) and no network for the hub."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("JAXTUNE_TEST_XLA_CACHE", "1") != "0":
    # One persistent compilation cache for the session and every process it starts: the tiny runs of
    # many tests compile the same steps. JAX logs a compile whether or not the cache served it, so the
    # compile-count tests count as before; the cache test uses its own directory.
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="jaxtune-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_data():
    """../shared/data, or a skip naming why."""
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip(f"{path} is absent (shared test data lives beside the repository)")
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A small plain-text corpus (runs.TEXT) for the tiny training runs."""
    from runs import TEXT

    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


# End-to-end modules (training runs, CLIs, real models); elsewhere a test of that kind, or one over 5 s
# (a transformers-parity grid, a TPU plan), carries @pytest.mark.e2e itself. The rest are the unit tests
# of about a minute: `make unit` (pytest -m "not e2e"). `make test` runs both.
E2E = {
    "test_lora",
    "test_train",
    "test_faults",
    "test_classify",
    "test_quickstart",
    "test_smollm2",
    "test_minilm",
    "test_predict",
    "test_multihost",
    "test_gcs",
}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__ in E2E:
            item.add_marker(pytest.mark.e2e)
