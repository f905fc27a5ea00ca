"""Data at scale: prepare throughput, and training's memory and data rate from prepared shards.

    .venv/bin/python benchmarks/data_prepare.py [--sizes 50,500] [--workers 0] [--steps 6] [--json FILE]

For each corpus size (MB of UTF-8 text) it generates a corpus (JSONL files of documents made of
English words drawn with a Zipf law, seeded, in a temporary folder), then:

1. runs the real `python -m jaxtune.prepare` on it (SmolLM2-135M's tokenizer, text format, rows of 129
   tokens) and reports the wall time (process start to exit, imports and worker start-up included), the
   tokens per second that makes, and the process's peak RSS;
2. runs the real `python -m jaxtune.train` from the prepared folder (SmolLM2-135M, float32, batch
   4 x 128, `--steps` steps) and reports the train process's peak RSS and the tokens/s its steps
   consume (`metrics.jsonl`, compilation left out, the first two steps dropped);
3. reads training batches from the same shards in this process (jaxtune's `Batches` over
   `PreparedRows`, a global shuffle) for 20 s and reports the tokens/s the loader delivers, and its
   ratio to what a training step consumes.

Peak RSS is each child's own (`wait4`). Needs `make install`; the corpus and shards are deleted after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have "
    "an they you were her she there been one all we their has would when if more no out so said what up "
    "its about than into them can only other new some time could these two may first then do any like my "
    "now over such our man me even most made after also did many before must through back years where much "
    "your way well down should because each just those people how too little state good very make world "
    "still own see men work long get here between both life being under never day same another know while "
    "last might us great old year off come since against go came right used take three"
).split()


def corpus(folder: str, megabytes: int, files: int = 10) -> None:
    """``megabytes`` of generated documents in ``files`` JSONL files."""
    rng = np.random.default_rng(megabytes)
    weights = 1.0 / np.arange(1, len(WORDS) + 1)
    weights /= weights.sum()
    per_file = megabytes * (1 << 20) // files
    vocab = np.array(WORDS)
    for f in range(files):
        with open(os.path.join(folder, f"part{f:03d}.jsonl"), "w", encoding="utf-8") as out:
            written = 0
            while written < per_file:
                words = vocab[rng.choice(len(WORDS), (256, 400), p=weights)]
                lines = [
                    json.dumps({"text": " ".join(doc[: rng.integers(50, 400)]) + "."}) + "\n" for doc in words
                ]
                block = "".join(lines)
                out.write(block)
                written += len(block)


def child(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd``; (wall seconds, peak RSS in bytes)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: the progress bar would fill a pipe
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status):
            log.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{log.read()[-3000:]}")
    return seconds, usage.ru_maxrss * 1024.0


def overrides(train: str) -> list[str]:
    from jaxtune import assets

    return [
        "--config.model.path=" + assets.smollm2_gguf(),
        "--config.model.tokenizer=",
        f"--config.data.train={train}",
        "--config.data.format=text",
        "--config.data.eval_fraction=0.0",
        "--config.data.seq_len=128",
        "--config.train.batch_size=4",
    ]


def loader_rate(folder: str, seconds: float = 20.0) -> float:
    """Tokens/s of training batches (4 x 128) read from the prepared shards in this process."""
    from jaxtune import data
    from jaxtune.config import defaults
    from jaxtune.data.loader import Batches
    from jaxtune.train import load_tokenizer

    config = defaults()
    config.model.path = overrides("")[0].split("=", 1)[1]
    c = config.data
    c.train, c.seq_len = f"prepared:{folder}", 128
    (rows,), _ = data.load(c, load_tokenizer(config), 0)
    batches = Batches(rows, 4, seed=0)
    next(batches)
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens += int(next(batches)["attention_mask"].sum())
    return tokens / (time.perf_counter() - start)


def measure(megabytes: int, workers: int, steps: int, work: str) -> dict:
    src, out, run = (os.path.join(work, f"{name}{megabytes}") for name in ("corpus", "rows", "run"))
    os.makedirs(src)
    corpus(src, megabytes)
    text_bytes = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
    config = os.path.join(ROOT, "configs", "pretrain_text.py")
    cmd = [sys.executable, "-m", "jaxtune.prepare", "--config", config, "--out", out, f"--workers={workers}"]
    prep_s, prep_rss = child([*cmd, *overrides(os.path.join(src, "*.jsonl"))])
    with open(os.path.join(out, "index.json")) as f:
        index = json.load(f)
    shard_bytes = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    shutil.rmtree(src)
    train = [sys.executable, "-m", "jaxtune.train", "--config", config, "--workdir", run]
    _, train_rss = child([*train, *overrides(f"prepared:{out}"), f"--config.train.max_steps={steps}"])
    with open(os.path.join(run, "metrics.jsonl")) as f:
        timed = [r for r in map(json.loads, f) if r["split"] == "train" and r["step"] > 2]
    step_rate = float(np.median([r["tokens_per_second"] for r in timed]))
    rate = loader_rate(out)
    shutil.rmtree(out)
    shutil.rmtree(run)
    return {
        "corpus_mb": round(text_bytes / 2**20, 1),
        "records": index["records"],
        "tokens": index["tokens"],
        "shards_mb": round(shard_bytes / 2**20, 1),
        "prepare_s": round(prep_s, 1),
        "prepare_tokens_per_s": round(index["tokens"] / prep_s),
        "prepare_rss_mb": round(prep_rss / 2**20),
        "train_rss_mb": round(train_rss / 2**20),
        "train_tokens_per_s": round(step_rate, 1),
        "loader_tokens_per_s": round(rate),
        "loader_over_step": round(rate / step_rate, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="50,500", help="corpus sizes in MB, comma-separated")
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (0: cores - 1; 1: in process)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--json", default="")
    args = p.parse_args()
    from jaxtune.mfu import cpu_name

    cpu = cpu_name()
    workers = args.workers or max(1, os.cpu_count() - 1)
    print(f"{platform.node()}: {cpu}, {os.cpu_count()} cores; tokenizer workers={workers}")
    results = []
    with tempfile.TemporaryDirectory() as work:
        for mb in (int(s) for s in args.sizes.split(",")):
            results.append(measure(mb, args.workers, args.steps, work))
            print(json.dumps(results[-1]), flush=True)
    keys = list(results[0])
    print(" | ".join(keys))
    for r in results:
        print(" | ".join(str(r[k]) for k in keys))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu, "cores": os.cpu_count(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
