"""Export a model or a training checkpoint to Hugging Face PyTorch weights.

    python -m jaxtune.export --model PATH --out DIR [--dtype bfloat16]
    python -m jaxtune.export --checkpoint WORKDIR[/checkpoints/STEP] --out DIR [--dtype bfloat16]

PATH is a Hugging Face directory, a hub id or a .gguf file; WORKDIR a training run's directory (its
latest checkpoint, or the STEP given). DIR receives config.json, safetensors (sharded above 5 GB, with
an index) and the tokenizer files, loadable by ``transformers.AutoModelFor<Task>.from_pretrained(DIR)``
with no extra code.
"""

from __future__ import annotations

import argparse
import sys

from jaxtune.pretrained import load_pretrained, load_tokenizer, save_pretrained

DTYPES = ("float32", "bfloat16", "float16")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxtune.export", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="Hugging Face directory, hub id or .gguf file")
    source.add_argument("--checkpoint", help="training run directory, or WORKDIR/checkpoints/STEP")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--dtype", default=None, choices=DTYPES, help="cast the weights (default: keep)")
    args = parser.parse_args(argv)
    try:
        if args.checkpoint:
            from jaxtune.checkpoint import restore_model

            model, tokenizer = restore_model(args.checkpoint)
        else:
            model = load_pretrained(args.model, dtype=args.dtype or "float32")
            try:
                tokenizer = load_tokenizer(args.model)
            except (OSError, ValueError) as e:
                print(f"warning: no tokenizer exported ({e})", file=sys.stderr)
                tokenizer = None
        save_pretrained(model, args.out, tokenizer=tokenizer, dtype=args.dtype)
    except (OSError, ValueError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
