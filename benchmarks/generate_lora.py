"""Generation and LoRA, side by side on this machine's CPU, SmolLM2-135M-Instruct (float32 unless --dtype).

    .venv/bin/python benchmarks/generate_lora.py [--reps 3] [--new 128] [--steps 10] [--dtype float32]
        [--decode_only] [--json FILE]

1. Decode: greedy generation of ``--new`` tokens (no early stop) for 1 and for 8 copies of a chat
   prompt, jaxtune's engine (jaxtune.engine.Engine, KV cache) against transformers' ``generate``
   (``do_sample=False``, its KV cache), alternating, ``--reps`` timed runs each after one untimed
   warm-up (jaxtune's compilation is in the warm-up). Reported: tokens per second of the whole call
   (prefill included), median over the runs; for jaxtune also the decode steps alone.
2. LoRA against a full fine-tune: the quickstart's job (configs/quickstart.py: rank-16 adapters on
   every projection) and the same with ``lora.rank=0`` (every weight trains), ``--steps`` steps each
   through the real ``python -m jaxtune.train``: median tokens/s after the first two steps (from
   metrics.jsonl) and the process's peak RSS. Needs `make install-test`.
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
PROMPT = [{"role": "user", "content": "Write a short poem about the sea."}]


def decode_rows(reps: int, new: int, dtype: str = "float32") -> list[dict]:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import torch
    import transformers

    import jaxtune
    from jaxtune import assets
    from jaxtune.engine import Engine

    path = assets.smollm2()
    tok = jaxtune.load_tokenizer(path)
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]
    engine = Engine(jaxtune.load_pretrained(path, dtype=dtype))  # weights, cache and compute in dtype
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    rows = []
    for batch in (1, 8):
        prompts = [ids] * batch
        x = torch.tensor(prompts)

        def ours(prompts=prompts):
            start = time.perf_counter()
            out = engine.generate(prompts, new, stop_ids=())
            wall = time.perf_counter() - start
            assert all(len(r) == new for r in out)
            return wall, engine.stats["decode_s"] / engine.stats["decode_steps"]

        def theirs(x=x):
            start = time.perf_counter()
            with torch.no_grad():
                out = ref.generate(
                    x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new,
                    min_new_tokens=new, pad_token_id=tok.pad_token_id,
                )  # fmt: skip
            assert out.shape[1] == len(ids) + new
            return time.perf_counter() - start

        ours(), theirs()  # warm-up: compilation, allocator, caches
        walls, steps, torch_walls = [], [], []
        for _ in range(reps):
            wall, step = ours()
            walls.append(wall)
            steps.append(step)
            torch_walls.append(theirs())
        j, t = batch * new / statistics.median(walls), batch * new / statistics.median(torch_walls)
        rows.append(
            {
                "row": f"decode batch {batch}, {new} new tokens, {dtype}",
                "jaxtune_tokens_per_s": j,
                "transformers_tokens_per_s": t,
                "ratio": j / t,
                "jaxtune_decode_step_ms": 1000 * statistics.median(steps),
            }
        )
    return rows


def _train(rank: int, steps: int, workdir: str) -> dict:
    """tokens/s (median after step 2) and peak RSS of a quickstart run with ``lora.rank = rank``."""
    args = [
        "--config", os.path.join(ROOT, "configs", "quickstart.py"), "--workdir", workdir,
        f"--config.lora.rank={rank}", f"--config.train.max_steps={steps}", "--noconfig.eval.at_start",
        "--config.sample.prompts=()", "--noconfig.export.at_end", "--config.eval.every_steps=0",
    ]  # fmt: skip
    code = (
        "import resource, runpy, sys\n"
        f"sys.argv = ['jaxtune.train'] + {args!r}\n"
        "try:\n    runpy.run_module('jaxtune.train', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, text=True)
    rss = int(out.stdout.split("PEAK_RSS_KB")[1].split()[0])
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if '"train"' in line]
    later = [r for r in rows if r["step"] > 2]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_second"] for r in later),
        "mfu": statistics.median(r["mfu"] for r in later),
        "peak_rss_gb": rss / 2**20,
    }


def lora_rows(steps: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        full = _train(0, steps, os.path.join(tmp, "full"))
        adapters = _train(16, steps, os.path.join(tmp, "lora"))
    return [
        {"row": "train, full fine-tune, 8 x 96", **full},
        {
            "row": "train, LoRA rank 16, 8 x 96",
            **adapters,
            "ratio": adapters["tokens_per_s"] / full["tokens_per_s"],
        },
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="decode rows' dtype")
    p.add_argument("--decode_only", action="store_true", help="leave out the LoRA training rows")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    rows = decode_rows(args.reps, args.new, args.dtype) + ([] if args.decode_only else lora_rows(args.steps))
    for r in rows:
        print(" | ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
