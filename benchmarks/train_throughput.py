"""Training throughput, side by side: jaxtune vs Hugging Face Trainer (PyTorch) on the same CPU.

    .venv/bin/python benchmarks/train_throughput.py [--rows lm_4x128,...] [--steps 8] [--repeats 1]
        [--json FILE]

Rows (all float32, AdamW at a constant lr, no clipping, no dropout on either side, one CPU process each side):
  lm_4x128   SmolLM2-135M-Instruct, causal LM on plain text, batch 4 x 128 tokens
  lm_1x1024  the same at batch 1 x 1024
  sft_8x512  SmolLM2, chat SFT (loss on the assistant's turns) packed into rows of 512, batch 8
  cls_32x64  all-MiniLM-L6-v2 sequence classification (chatterbot topics), batch 32 x 64 tokens

jaxtune runs its real command (`python -m jaxtune.train`); Trainer runs in a child process of this
script on the same weights (the HF directory both load; MiniLM's new classifier is jaxtune's, saved
with `save_pretrained`) and on the very batches jaxtune trains on, in its order: they are built with
jaxtune's own data pipeline and seed. The data are the chatterbot-corpus dialogs from PyPI. For each row
the two sides alternate (jaxtune, Trainer, jaxtune, ... with --repeats); step times are each run's own
(jaxtune's `step_seconds` in metrics.jsonl, which leaves compilation out; a Trainer callback at each
step end); the first two steps of each run are left out, the median of the rest is reported. Tokens
are each batch's real tokens (its attention mask), the same batches on both sides. tokens/s is the
median of each step's rate, so where batches differ in real tokens (the classifier row) it and the
median step time may come from different steps. Peak RSS is each child process's own
(`wait4`). Needs `make install-test`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    what: str
    config: str  # configs/ file the jaxtune side starts from
    overrides: tuple  # --config.KEY=VALUE, with {corpus}, {model} filled in


LM = (
    "--config.model.path={smollm2}",
    "--config.model.tokenizer=",
    "--config.data.train={text}",
    "--config.data.format=text",
)
COMMON = (
    "--config.data.eval_fraction=0.0",
    "--config.optimizer.lr=5e-5",
    "--config.optimizer.warmup_steps=0",
    "--config.optimizer.warmup_ratio=0.0",
    "--config.optimizer.schedule=constant",
    "--config.optimizer.clip_norm=0.0",
    "--config.optimizer.lr_layer_decay=1.0",
    "--config.eval.every_steps=0",
    "--config.eval.at_start=False",
    "--config.checkpoint.every_steps=0",
    "--config.checkpoint.best_metric=",
    "--config.export.at_end=False",
    "--config.train.log_every=1",
)
ROWS = {
    r.name: r
    for r in (
        Row("lm_4x128", "SmolLM2-135M causal LM, 4 x 128", "smoke.py", (*LM, "--config.data.seq_len=128",
            "--config.train.batch_size=4")),
        Row("lm_1x1024", "SmolLM2-135M causal LM, 1 x 1024", "smoke.py", (*LM, "--config.data.seq_len=1024",
            "--config.train.batch_size=1")),
        Row("sft_8x512", "SmolLM2-135M packed chat SFT, 8 x 512", "quickstart.py", (
            "--config.model.path={smollm2}", "--config.lora.rank=0", "--config.data.packing=True",
            "--config.data.seq_len=512", "--config.train.batch_size=8", "--config.sample.prompts=()")),
        Row("cls_32x64", "all-MiniLM-L6-v2 classification, 32 x 64", "chatterbot_topics.py", (
            "--config.data.seq_len=64", "--config.data.pad_to_multiple_of=0",
            "--config.train.batch_size=32", "--config.optimizer.weight_decay=0.0")),
    )
}  # fmt: skip


def overrides(row: Row, steps: int, text: str) -> list[str]:
    from jaxtune import assets

    fill = {"smollm2": assets.smollm2(), "text": text}
    return [o.format(**fill) for o in (*row.overrides, *COMMON)] + [f"--config.train.max_steps={steps}"]


def corpus_text(path: str) -> str:
    """The chatterbot dialogs as one plain-text file (one utterance a line, a blank line between
    dialogs): the causal-LM rows' text."""
    from jaxtune import assets, data

    records = data.records(os.path.join(assets.chatterbot_corpus(), "*.yml"), "corpus", "train")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join("\n".join(m["content"] for m in data.chat_messages(r, o)) for r, o in records))
    return path


def child(cmd: list[str], env: dict) -> float:
    """Run ``cmd``; its peak RSS in bytes."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return usage.ru_maxrss * 1024.0


def environment() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
    env.pop("XLA_FLAGS", None)  # one CPU device, as PyTorch sees the machine
    return env


def jaxtune_run(row: Row, steps: int, text: str, workdir: str) -> dict:
    cmd = [sys.executable, "-m", "jaxtune.train", "--config", os.path.join(ROOT, "configs", row.config)]
    rss = child([*cmd, "--workdir", workdir, *overrides(row, steps, text)], environment())
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if r["split"] == "train"]
    timed = [r for r in rows if r["step"] > 2]
    return {
        "step_seconds": [r["step_seconds"] for r in timed],
        "tokens": [r["tokens_per_second"] * r["step_seconds"] for r in timed],
        "mfu": [r["mfu"] for r in timed],
        "peak_rss": rss,
    }


def trainer_run(row: Row, steps: int, text: str, workdir: str) -> dict:
    out = os.path.join(workdir, "trainer.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--trainer-child", row.name, "--steps", str(steps)]
    rss = child([*cmd, "--text", text, "--workdir", workdir, "--out", out], environment())
    with open(out) as f:
        result = json.load(f)
    return dict(result, peak_rss=rss)


def trainer_child(row: Row, steps: int, text: str, workdir: str, out: str) -> None:
    """Hugging Face Trainer on the batches jaxtune's run of ``row`` trains on (child process)."""
    import numpy as np
    import torch
    import transformers

    import jaxtune
    from jaxtune import cli, data
    from jaxtune.data.loader import Batches
    from jaxtune.models import layers
    from jaxtune.train import load_tokenizer

    config = cli.load_config(os.path.join(ROOT, "configs", row.config), overrides(row, steps, text))
    c, seed = config.data, config.train.seed
    tokenizer = load_tokenizer(config)
    labels = data.training_labels(config)
    rows, _ = data.load(c, tokenizer, seed, labels)
    batches = Batches(rows, config.train.batch_size, seed)

    def tensor(a):  # torch wants int64 ids and labels
        a = np.asarray(a)
        return torch.from_numpy(a.astype(np.int64) if np.issubdtype(a.dtype, np.integer) else a)

    examples, tokens = [], []
    for _ in range(steps):
        b = next(batches)
        tokens.append(int(b["attention_mask"].sum()))  # the batch's real tokens, as jaxtune counts them
        for i in range(len(b["input_ids"])):
            keys = ("input_ids", "attention_mask", "token_type_ids", "labels")
            ex = {k: tensor(b[k][i]) for k in keys if k in b}
            if labels is None:
                # Trainer's models shift the labels themselves: position t's label is token t.
                target = np.where(b["loss_mask"][i] > 0, b["targets"][i], -100)
                ex["labels"] = tensor(np.concatenate([[-100], target[:-1]]))
                if "segment_ids" in b:  # packed: positions restart per example, as jaxtune's do
                    seg = b["segment_ids"][i : i + 1]
                    ex["position_ids"] = tensor(layers.default_positions(None, seg, *seg.shape)[0])
            examples.append(ex)
    if labels is not None:
        start = os.path.join(workdir, "start")  # jaxtune's starting weights, its new classifier included
        model = jaxtune.load_pretrained(
            config.model.path, task="sequence_classification", id2label=list(labels.names), seed=seed
        )
        jaxtune.save_pretrained(model, start)
        del model
        # Dropout as jaxtune's run has it (the row's config: none). BERT checkpoints carry 0.1, and
        # Trainer would otherwise draw masks at four sites per layer that jaxtune does not.
        rate = config.model.dropout
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            start,
            dtype=torch.float32,
            hidden_dropout_prob=rate,
            attention_probs_dropout_prob=rate,
            classifier_dropout=rate,
        )
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(config.model.path, dtype=torch.float32)
    ends = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    class InOrder(transformers.Trainer):  # jaxtune's batches, in jaxtune's order
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

    o = config.optimizer
    args = transformers.TrainingArguments(
        output_dir=os.path.join(workdir, "trainer"),
        per_device_train_batch_size=config.train.batch_size,
        max_steps=steps,
        learning_rate=o.lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.b1,
        adam_beta2=o.b2,
        adam_epsilon=o.eps,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        logging_steps=steps,
        disable_tqdm=True,
        seed=seed,
    )
    InOrder(model=model, args=args, train_dataset=examples, callbacks=[Clock()]).train()
    seconds = [b - a for a, b in zip(ends[1:], ends[2:], strict=False)]
    with open(out, "w") as f:
        json.dump({"step_seconds": seconds, "tokens": tokens[2:]}, f)


def summary(runs: list[dict]) -> dict:
    seconds = [s for r in runs for s in r["step_seconds"]]
    tokens = [t for r in runs for t in r["tokens"]]
    step = statistics.median(seconds)
    out = {
        "step_seconds": step,
        "tokens_per_second": statistics.median(t / s for t, s in zip(tokens, seconds, strict=True)),
        "peak_rss_gb": max(r["peak_rss"] for r in runs) / 1e9,
        "steps_timed": len(seconds),
    }
    if "mfu" in runs[0]:
        out["mfu"] = statistics.median(m for r in runs for m in r["mfu"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated, of: " + ", ".join(ROWS))
    parser.add_argument("--steps", type=int, default=8, help="steps per run (the first two are not timed)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side per row, alternating")
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--trainer-child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--text", default="", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trainer_child:
        return trainer_child(ROWS[args.trainer_child], args.steps, args.text, args.workdir, args.out)
    names = [n for n in args.rows.split(",") if n]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown row(s) {', '.join(unknown)}; rows are {', '.join(ROWS)}")
    if args.steps < 3:
        parser.error("--steps must be at least 3 (the first two steps are not timed)")
    from jaxtune import assets, mfu

    assets.smollm2()  # convert the GGUF file once, outside every run
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": mfu.cpu_name(),
        "cores": os.cpu_count(),
        "commit": commit.stdout.strip(),
        "steps": args.steps,
        "repeats": args.repeats,
        "rows": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        text = corpus_text(os.path.join(tmp, "chatterbot.txt"))
        for name in names:
            runs = {"jaxtune": [], "trainer": []}
            for i in range(args.repeats):
                for side, fn in (("jaxtune", jaxtune_run), ("trainer", trainer_run)):
                    workdir = os.path.join(tmp, f"{name}-{side}-{i}")
                    runs[side].append(fn(ROWS[name], args.steps, text, workdir))
                    print(f"  {name} {side} run {i + 1}: {summary(runs[side][-1:])}", flush=True)
            ours, theirs = summary(runs["jaxtune"]), summary(runs["trainer"])
            results["rows"][name] = {
                "what": ROWS[name].what,
                "jaxtune": ours,
                "trainer": theirs,
                "ratio": ours["tokens_per_second"] / theirs["tokens_per_second"],
            }
    print(f"\n{results['date']}, {results['cpu']} ({results['cores']} cores), commit {results['commit']}")
    print(f"{'row':11s} {'jaxtune tok/s':>13s} {'Trainer tok/s':>13s} {'ratio':>6s} {'jaxtune step':>12s} "
          f"{'Trainer step':>12s} {'MFU':>5s} {'jaxtune RSS':>11s} {'Trainer RSS':>11s}")  # fmt: skip
    for name, r in results["rows"].items():
        a, b = r["jaxtune"], r["trainer"]
        print(
            f"{name:11s} {a['tokens_per_second']:13.1f} {b['tokens_per_second']:13.1f} {r['ratio']:6.2f} "
            f"{a['step_seconds']:11.2f}s {b['step_seconds']:11.2f}s {a['mfu']:5.0%} "
            f"{a['peak_rss_gb']:9.2f}GB {b['peak_rss_gb']:9.2f}GB"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
