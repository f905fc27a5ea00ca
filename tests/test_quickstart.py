"""`make demo`'s job (configs/quickstart.py) end to end on the real SmolLM2 and chatterbot data, cut
to two steps: eval before and after, a sample answer, and an export transformers loads."""

import importlib.util
import json
import pathlib

import pytest
from runs import one_device

from jaxtune import train

pytestmark = pytest.mark.slow
CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "quickstart.py"


def test_quickstart_trains_samples_and_exports(tmp_path, capsys):
    import torch
    import transformers

    spec = importlib.util.spec_from_file_location("quickstart", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    with config.unlocked():
        config.train.max_steps = 2
        config.eval.max_batches = 1
        config.sample.max_new_tokens = 4
    summary = train.run(config, str(tmp_path), devices=one_device())  # as `make demo` runs on a CPU
    assert summary["step"] == 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2] and 0 < evals[0]["loss"] < 10
    assert "sample> Do you like pizza?" in capsys.readouterr().out
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "export", output_loading_info=True, dtype=torch.float32
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (tmp_path / "export" / "tokenizer.json").exists()
