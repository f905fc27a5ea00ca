"""`make demo`'s job runs end to end on the real model (its output is what a user sees first)."""

import re

import pytest

from jaxtune import demo

pytestmark = pytest.mark.slow


def test_demo_answers_exports_and_round_trips(tmp_path, capsys):
    demo.main(["--out", str(tmp_path / "export")])
    out = capsys.readouterr().out
    assert "assistant: The capital of France is Paris." in out
    assert (tmp_path / "export" / "model.safetensors").exists()
    assert (tmp_path / "export" / "tokenizer.json").exists()
    diff = float(re.search(r"max \|logit difference\| = (\S+)", out).group(1))
    assert diff == 0.0
