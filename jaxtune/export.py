"""Export a model or a training checkpoint to Hugging Face PyTorch weights.

    python -m jaxtune.export --model PATH --out DIR [--dtype bfloat16]
    python -m jaxtune.export --checkpoint WORKDIR[/checkpoints/STEP] --out DIR [--dtype bfloat16]
    python -m jaxtune.export --checkpoint WORKDIR --out DIR --adapter

PATH is a Hugging Face directory, a hub id or a .gguf file; WORKDIR a training run's directory (its
latest checkpoint, or the STEP given). DIR receives config.json, safetensors (sharded above 5 GB, with
an index) and the tokenizer files, loadable by ``transformers.AutoModelFor<Task>.from_pretrained(DIR)``
with no extra code. A run that trained LoRA adapters exports merged (``W + scale * B A``, a plain
model); with ``--adapter`` it writes the adapters alone as a PEFT directory instead
(``adapter_config.json`` + ``adapter_model.safetensors``), which
``peft.PeftModel.from_pretrained(base_model, DIR)`` loads. A non-empty DIR is refused unless
``--overwrite``.
"""

from __future__ import annotations

import os
import sys

from jaxtune import cli, fs
from jaxtune.config import DTYPES
from jaxtune.errors import OutputError, UsageError


def check_out(out: str, overwrite: bool) -> None:
    """An export goes to a new or empty directory, or replaces one with ``--overwrite`` (its old weight
    files and indexes are removed, so no stale shard or index is loaded in place of the new weights)."""
    if fs.exists(out) and not fs.isdir(out):
        raise OutputError(f"--out {out}: a file stands there; pass a directory path")
    if fs.isdir(out) and fs.listdir(out) and not overwrite:
        raise OutputError(
            f"--out {out} is not empty; pass --overwrite to replace the model in it, "
            "or choose a new directory"
        )


def export(args) -> None:
    from jaxtune.checkpoint import load_model
    from jaxtune.distributed import is_main
    from jaxtune.hf import stale_weight_files
    from jaxtune.pretrained import save_pretrained

    check_out(args.out, args.overwrite)
    if args.adapter and not args.checkpoint:
        raise UsageError("--adapter exports a training run's LoRA adapters; pass --checkpoint WORKDIR")
    if args.adapter:
        from jaxtune.checkpoint import split_path
        from jaxtune.pretrained import read_lora

        workdir = split_path(args.checkpoint)[0]
        if read_lora(os.path.join(workdir, "model")) is None:
            raise UsageError(
                f"--checkpoint {workdir}: the run trained no LoRA adapters; export it without --adapter"
            )
        if args.dtype:
            raise UsageError("--dtype applies to a merged export; a PEFT adapter keeps the adapters' dtype")
    model, tokenizer = load_model(args.checkpoint, args.model, dtype=args.dtype or "float32")
    if args.adapter:  # every process; 0 writes
        from jaxtune import adapter

        with fs.staged(args.out) as out:
            adapter.save(model, out, base=_base_model(args.checkpoint))
    else:
        # A URL: written here, then uploaded; process 0 writes, and only it clears an older model's weights.
        with fs.staged(args.out, stale=stale_weight_files if is_main() else None) as out:
            save_pretrained(model, out, tokenizer=tokenizer, dtype=args.dtype)  # every process; 0 writes
    if is_main():
        print(f"wrote {args.out}")


def _base_model(checkpoint: str) -> str:
    """The ``model.path`` a run trained from, as its ``config.json`` records it ("" when unknown)."""
    import json

    from jaxtune.checkpoint import split_path

    try:
        config = json.loads(fs.read_text(os.path.join(split_path(checkpoint)[0], "config.json")))
        return str(config["model"]["path"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def main(argv=None) -> int:
    p = cli.parser("export", __doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="Hugging Face directory, hub id or .gguf file")
    source.add_argument("--checkpoint", help="training run directory, or WORKDIR/checkpoints/STEP")
    p.add_argument("--out", required=True, help="output directory (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace the model in a non-empty --out")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="cast the weights (default: keep)")
    p.add_argument("--adapter", action="store_true", help="write the LoRA adapters as a PEFT directory")
    return cli.main(p, export, argv, multihost=True)


if __name__ == "__main__":
    sys.exit(main())
