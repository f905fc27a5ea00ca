"""Test set-up: 8 host CPU devices (set before jax is imported) and no network for the hub."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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


# End-to-end modules (training runs, CLIs, real models); the rest are unit tests that run in about a
# minute: `make unit` (pytest -m "not e2e"). `make test` runs both.
E2E = {
    "test_train",
    "test_faults",
    "test_classify",
    "test_quickstart",
    "test_smollm2",
    "test_minilm",
    "test_predict",
    "test_multihost",
}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__ in E2E:
            item.add_marker(pytest.mark.e2e)
