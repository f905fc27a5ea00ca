"""Tokenize a config's data once, into shards that training reads by row.

    python -m jaxtune.prepare --config configs/X.py[:arg] [--config.KEY=VALUE ...] --out DIR [--workers N]

Reads ``data.train`` (and ``data.eval``) as the config names them, tokenizes in worker processes,
cuts or packs rows of ``data.seq_len + 1`` tokens exactly as training in memory would, and writes
ArrayRecord shards and ``DIR/index.json``. Then train with ``--config.data.train=prepared:DIR``: rows
are read by number in a global shuffle, so memory does not grow with the corpus. An interrupted
prepare resumes when run again; a rerun on unchanged inputs does nothing.
"""

from __future__ import annotations

import sys

from jaxtune import cli
from jaxtune.errors import UsageError


def prepare(config, out: str, workers: int = 0, progress: bool = True, rows_per_shard: int = 0) -> dict:
    """Prepare ``config.data`` into ``out``; returns the index."""
    from jaxtune.config import validate
    from jaxtune.data.prepare import Prepare
    from jaxtune.train import load_tokenizer

    for flag, value in (("--workers", workers), ("--rows_per_shard", rows_per_shard)):
        if value < 0:
            raise UsageError(f"python -m jaxtune.prepare: {flag} {value} must be >= 0 (0: the default)")
    validate(config, None)
    tokenizer = load_tokenizer(config)
    return Prepare(config.data, tokenizer, out, config.train.seed, workers, rows_per_shard).run(progress)


def main(argv=None) -> int:
    p = cli.parser("prepare", __doc__)
    p.add_argument("--config", required=True, metavar="configs/X.py[:arg]", help="the run's config file")
    p.add_argument("--out", required=True, help="the folder of the shards and index.json")
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="tokenizer processes (default: data.workers, else cores - 1; 1: in process)",
    )
    p.add_argument(
        "--rows_per_shard",
        type=int,
        default=0,
        help="rows a shard holds (the last of each part fewer; default: about 64 MB of rows)",
    )
    return cli.main(
        p,
        lambda args: prepare(args.config, args.out, args.workers, rows_per_shard=args.rows_per_shard),
        argv,
        with_config=True,
        compilation_cache=False,
    )


if __name__ == "__main__":
    sys.exit(main())
