"""Fine-tuning quality, side by side: jaxtune's `configs/minilm_sst2.py` vs Hugging Face Trainer (PyTorch)
running the identical recipe, both scored on the SST-2 dev set.

    .venv/bin/python benchmarks/minilm_sst2.py [--records 8000] [--dropout 0.1] [--out FILE.json]

jaxtune runs its own command (`python -m jaxtune.train --config configs/minilm_sst2.py`); its dev
accuracy is the final eval in the run's metrics.jsonl. Trainer then trains the same starting weights
(all-MiniLM-L6-v2 with the classifier jaxtune initialised from the same seed, exported through
`save_pretrained`) on the same sentences in the same batch order (jaxtune's Grain order, fed through a
sequential sampler), with the same AdamW (weight decay 0.01, none on biases and LayerNorm), the same
layer-wise learning rates as parameter groups, the same warmup + linear schedule, clipping at 1.0 and
the same dropout rate at the same sites (0 by default, as in the recipe; with a rate the two sides draw
different masks, so only the accuracies' closeness can be compared). Trainer pads each batch to
its longest sentence where jaxtune pads to 64: with attention masks the results are the same, and the
wall times are not comparable. Needs ../shared/data/sst2 and `make install-test`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "minilm_sst2.py")


def recipe(records: int):
    """configs/minilm_sst2.py's config, loaded from its file (this script has the same module name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("minilm_sst2_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(str(records))


def jaxtune_run(records: int, workdir: str, dropout: float) -> dict:
    cmd = [sys.executable, "-m", "jaxtune.train", "--config", f"{CONFIG}:{records}", "--workdir", workdir]
    cmd.append(f"--config.model.dropout={dropout}")
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device, as PyTorch sees the machine
    t0 = time.perf_counter()
    subprocess.run([*cmd, "--config.export.at_end=False"], check=True, env=env)
    seconds = time.perf_counter() - t0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if r["split"] == "eval"]
    return {
        "accuracy": evals[-1]["accuracy"],
        "curve": [(r["step"], r["accuracy"]) for r in evals],
        "seconds": seconds,
    }


def trainer_run(config, workdir: str, dropout: float) -> dict:
    import numpy as np
    import torch
    import transformers

    import jaxtune
    from jaxtune import data
    from jaxtune.data.classify import label_map
    from jaxtune.data.loader import Batches

    torch.manual_seed(config.train.seed)
    c = config.data
    train = data.train_groups(c)[0]
    labels = label_map(train, c.label_field).names
    dev = data.records(c.eval, "data.eval", c.eval_split)
    # The starting point of the jaxtune run: the checkpoint plus the classifier it draws from the seed.
    start = os.path.join(workdir, "start")
    model = jaxtune.load_pretrained(
        config.model.path, task="sequence_classification", id2label=list(labels), seed=config.train.seed
    )
    jaxtune.save_pretrained(model, start, tokenizer=jaxtune.load_tokenizer(config.model.path))
    del model
    tokenizer = transformers.AutoTokenizer.from_pretrained(start)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        start, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, classifier_dropout=dropout
    )

    def encode(recs):
        enc = tokenizer([r[c.text_field] for r, _ in recs], truncation=True, max_length=c.seq_len)
        ids = {name: i for i, name in enumerate(labels)}
        return [
            {**{k: enc[k][i] for k in enc}, "labels": ids[str(r[c.label_field]).strip()]}
            for i, (r, _) in enumerate(recs)
        ]

    examples = encode(train)
    bs, epochs = config.train.batch_size, config.train.num_epochs
    batches = Batches({"labels": np.arange(len(examples))}, bs, config.train.seed)
    steps = epochs * batches.steps_per_epoch
    order = np.concatenate([next(batches)["labels"] for _ in range(steps)])
    ordered = [examples[i] for i in order]

    o = config.optimizer
    layers = model.config.num_hidden_layers
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if ".encoder.layer." in name:
            scale = o.lr_layer_decay ** (layers - int(name.split(".encoder.layer.")[1].split(".")[0]))
        elif ".embeddings." in name:
            scale = o.lr_layer_decay ** (layers + 1)
        else:  # pooler, classifier
            scale = 1.0
        decay = 0.0 if name.endswith("bias") or "LayerNorm" in name else o.weight_decay
        groups.setdefault((scale, decay), []).append(p)
    opt = torch.optim.AdamW(
        [{"params": ps, "lr": o.lr * s, "weight_decay": d} for (s, d), ps in groups.items()],
        lr=o.lr,
        betas=(o.b1, o.b2),
        eps=o.eps,
    )
    warmup = o.warmup_steps or int(np.ceil(o.warmup_ratio * steps))
    schedule = transformers.get_linear_schedule_with_warmup(opt, warmup, steps)

    class InOrder(transformers.Trainer):  # jaxtune's batch order, already laid out epoch after epoch
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

    args = transformers.TrainingArguments(
        output_dir=os.path.join(workdir, "trainer"),
        per_device_train_batch_size=bs,
        num_train_epochs=1,
        max_grad_norm=o.clip_norm,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        logging_steps=50,
        seed=config.train.seed,
    )
    collate = transformers.DataCollatorWithPadding(tokenizer)
    trainer = InOrder(
        model=model,
        args=args,
        train_dataset=ordered,
        data_collator=collate,
        optimizers=(opt, schedule),
    )
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    model.eval()
    dev_examples = encode(dev)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(dev_examples), 64):
            batch = collate(dev_examples[i : i + 64])
            gold = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == gold).sum())
    return {"accuracy": correct / len(dev_examples), "seconds": seconds, "dev": len(dev_examples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=8000, help="SST-2 training sentences (from the start)")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout rate on both sides")
    parser.add_argument("--out", default="", help="also write the results here as JSON")
    args = parser.parse_args()
    config = recipe(args.records)
    with tempfile.TemporaryDirectory() as tmp:
        ours = jaxtune_run(args.records, os.path.join(tmp, "jaxtune"), args.dropout)
        theirs = trainer_run(config, tmp, args.dropout)
    o = config.optimizer
    print(
        f"\nall-MiniLM-L6-v2 on the first {args.records} SST-2 sentences, {config.train.num_epochs} epochs, "
        f"batch {config.train.batch_size}, max {config.data.seq_len} tokens, AdamW lr {o.lr} "
        f"(layer decay {o.lr_layer_decay}), warmup {o.warmup_ratio:.0%} + {o.schedule}, "
        f"weight decay {o.weight_decay}, dropout {args.dropout}; {theirs['dev']} dev sentences"
    )
    for name, r, what in (("jaxtune", ours, "whole command"), ("HF Trainer (torch)", theirs, "train only")):
        print(f"  {name:18s} dev accuracy {r['accuracy']:.2%}  ({r['seconds']:.0f} s, {what})")
    print(f"  difference {100 * (ours['accuracy'] - theirs['accuracy']):+.2f} points")
    print("  jaxtune's evals: " + ", ".join(f"step {s}: {a:.2%}" for s, a in ours["curve"]))
    if args.out:
        with open(args.out, "w") as f:
            results = {"records": args.records, "dropout": args.dropout, "jaxtune": ours, "trainer": theirs}
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
