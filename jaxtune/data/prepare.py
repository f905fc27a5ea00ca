"""Sources -> token rows -> ArrayRecord shards (``python -m jaxtune.prepare``), resumable.

The rows are those the in-memory path (:func:`jaxtune.data.load`) makes from the same config and
seed, in the same order: the same groups (one per source with ``data.weights``), the same held-out
records (``data.eval_fraction``), the same cutting and packing (:class:`.packing.RowBuilder`). Records
are read one at a time and tokenized in worker processes (:mod:`.tokenize`), so memory does not grow
with the corpus.

Resuming: each time the training rows pending reach a shard's worth, every pending row is written
(shards are complete files, renamed into place) and ``progress.json`` records how far the reading got
and the builders' carried state (``carry-N.npz``: the tokens of an unfinished row, the open rows of a
packer, the dedupe set). A rerun of an interrupted prepare starts there and ends with the same shards
and the same ``index.json`` as an uninterrupted one; a rerun of a finished one does nothing.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
import os
import time

import numpy as np

from jaxtune import data
from jaxtune.data import shards
from jaxtune.data.packing import RowBuilder
from jaxtune.data.sources import DataError, expand, fingerprint, iterate
from jaxtune.data.tokenize import Tokenizers, chunks

log = logging.getLogger(__name__)
PROGRESS = "progress.json"
SHARD_BYTES = 64 << 20  # a shard's target size


def describe(c, tokenizer, seed: int) -> dict:
    """Everything the rows depend on, as the index records it; its hash is the index's ``key``."""
    train = expand(c.train, "data.train")
    evals = expand(c.eval, "data.eval") if c.eval else []
    if any(s.startswith("prepared:") for s in train + evals):
        raise DataError(
            "config key data.train / data.eval: name the raw sources to prepare, not prepared:DIR"
        )
    if c.format == "classification":
        raise DataError(
            "config key data.format = 'classification': prepare writes language-model rows (text, chat, "
            "instruction); classification sets train in memory"
        )
    return {
        "version": shards.VERSION,
        "tokenizer": data.tokenizer_fingerprint(tokenizer),
        "chat_template": getattr(tokenizer, "chat_template", None) if c.format != "text" else None,
        "format": c.format,
        "seq_len": c.seq_len,
        "packing": bool(c.packing) and c.format != "text",
        "pack_window": c.pack_window,
        "loss_on": c.loss_on if c.format != "text" else None,
        "too_long": c.too_long,
        "text_field": c.text_field,
        "weights": bool(c.weights),
        "max_train_records": c.max_train_records,
        "dedupe": c.dedupe,
        "eval_fraction": c.eval_fraction,
        "seed": seed if c.eval_fraction else None,
        "sources": [fingerprint(s, c.split, c.data_dir) for s in train],
        "eval_sources": [fingerprint(s, c.eval_split, c.data_dir) for s in evals],
    }


def _key(described: dict) -> str:
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _write_json(path: str, value: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, default=str)
    os.replace(tmp, path)


def _differs(old: dict, new: dict) -> str:
    for key in new:
        if old.get(key) != new[key]:
            return key
    return "version"


class Part:
    """The shards of one row set (a training group, or the eval rows): rows pending until written."""

    def __init__(self, out: str, name: str, builder: RowBuilder, saved: dict | None = None):
        self.out, self.name, self.builder = out, name, builder  # a group's builder replaces it
        saved = saved or {"shards": [], "rows": 0, "tokens": 0}
        self.shards, self.rows, self.tokens = list(saved["shards"]), saved["rows"], saved["tokens"]
        self.pending: list = []

    def add(self, items) -> None:
        for item in items:
            self.pending += self.builder.add(item)

    def finish(self) -> None:
        self.pending += self.builder.flush()

    def write(self) -> None:
        if not self.pending:
            return
        rows = self.builder.arrays(self.pending)
        self.pending = []
        self.write_rows(rows)

    def write_rows(self, rows: dict) -> None:
        name = f"{self.name}-{len(self.shards):05d}.arrayrecord"
        size = shards.write_shard(os.path.join(self.out, name), rows)
        n = len(rows["tokens"])
        self.shards.append({"file": name, "rows": n, "bytes": size})
        self.rows += n
        self.tokens += int(rows["mask"].sum())

    def saved(self) -> dict:
        return {"shards": self.shards, "rows": self.rows, "tokens": self.tokens}


def _digest(record: dict) -> bytes:
    return hashlib.blake2b(json.dumps(record, sort_keys=True, default=str).encode(), digest_size=16).digest()


class Prepare:
    """One prepare of ``config.data`` into ``out``: :meth:`run` does it, or finishes an interrupted one."""

    def __init__(self, c, tokenizer, out: str, seed: int, workers: int = 0, shard_rows: int = 0):
        self.c, self.tokenizer, self.out, self.seed = c, tokenizer, out, seed
        self.workers = workers or c.workers
        self.described = describe(c, tokenizer, seed)
        self.key = _key(self.described)
        width = c.seq_len + 1
        self.shard_rows = shard_rows or max(1, SHARD_BYTES // (width * (10 if c.packing else 6)))
        self.eos = tokenizer.eos_token_id
        self.tokens_in = 0

    # -- what is there already ---------------------------------------------------------------------------
    def _existing(self) -> dict | None:
        """The index if ``out`` is prepared from these inputs already (None: work to do); a DataError if
        it holds data of other inputs or files that are not a prepare's."""
        index_path = os.path.join(self.out, shards.INDEX)
        if os.path.exists(index_path):
            index = shards.read_index(self.out)
            if index.get("key") == self.key:
                return index
            raise DataError(
                f"{index_path}: prepared from other inputs ({_differs(index, self.described)} differs); "
                "use another --out, or delete the folder to prepare it again"
            )
        if os.path.isdir(self.out):
            foreign = [
                f
                for f in os.listdir(self.out)
                if not (f.endswith((".arrayrecord", ".tmp", ".npz")) or f == PROGRESS)
            ]
            if foreign:
                raise DataError(
                    f"{self.out}: not empty and not a prepare's folder ({foreign[0]}); "
                    "give an empty or new --out"
                )
        return None

    def _progress(self) -> dict | None:
        path = os.path.join(self.out, PROGRESS)
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            progress = json.load(f)
        if progress.get("key") != self.key:
            raise DataError(
                f"{path}: an unfinished prepare of other inputs; delete {self.out} or use another --out"
            )
        return progress

    # -- the work ----------------------------------------------------------------------------------------
    def run(self, progress_bar: bool = True) -> dict:
        done = self._existing()
        if done is not None:
            log.info("%s is prepared already from these inputs: nothing to do", self.out)
            return done
        os.makedirs(self.out, exist_ok=True)
        state = self._progress() or {
            "key": self.key,
            "group": 0,
            "read": 0,
            "kept": 0,
            "parts": [],
            "carry": None,
        }
        self._clean(state)
        if state["group"] or state["read"]:
            log.info(
                "resuming the prepare of %s at group %d, record %d", self.out, state["group"], state["read"]
            )
        groups = self._groups()
        from tqdm import tqdm

        self.bar = tqdm(desc="prepare", unit=" records", disable=not progress_bar, mininterval=1.0)
        self.start = time.perf_counter()
        self.truncated, self.dropped = state.get("truncated", 0), state.get("dropped", 0)
        self.records = state.get("records", 0)
        self.parts = [Part(self.out, f"train{i}", self._builder(), p) for i, p in enumerate(state["parts"])]
        self.eval = Part(self.out, "eval", self._builder(), state.get("eval"))
        with Tokenizers(self.tokenizer, self.c, self.workers) as tokenizers:
            self.tokenizers = tokenizers
            for g in range(state["group"], len(groups)):
                resume = state if g == state["group"] else None
                self._group(g, groups[g], resume)
        self.bar.close()
        return self._index()

    def _groups(self) -> list:
        """Lists of (source, split): the training groups, then the eval sources as the last one."""
        c = self.c
        train = [(s, c.split) for s in expand(c.train, "data.train")]
        groups = [[s] for s in train] if c.weights else [train]
        return groups + ([[(s, c.eval_split) for s in expand(c.eval, "data.eval")]] if c.eval else [])

    def _builder(self) -> RowBuilder:
        return RowBuilder(self.c, self.eos)

    def _records(self, group, limit: int = 0):
        out = itertools.chain.from_iterable(iterate(s, split, self.c.data_dir) for s, split in group)
        return itertools.islice(out, limit) if limit else out

    def _is_eval_group(self, g: int) -> bool:
        return bool(self.c.eval) and g == len(self._groups()) - 1

    def _held(self, group) -> np.ndarray | None:
        """Which kept records are held out (``data.eval_fraction``), as the in-memory path picks them:
        a seeded permutation of the group's record count, found by a first pass over the records."""
        c = self.c
        if not c.eval_fraction:
            return None
        seen, n = set(), 0
        for record, _ in self._records(group, c.max_train_records):
            if c.dedupe:
                d = _digest(record)
                if d in seen:
                    continue
                seen.add(d)
            n += 1
        if c.format == "text" and n < 2:
            return np.zeros(0, bool)  # one document: its rows are split instead (see _group)
        order = np.random.default_rng(self.seed).permutation(n)
        held = np.zeros(n, bool)
        held[order[: max(1, int(round(n * c.eval_fraction)))]] = True
        return held

    def _group(self, g: int, group, resume: dict | None) -> None:
        """Rows of one group into its part; its held-out rows (``data.eval_fraction``) into the eval
        part through a builder of their own, as the in-memory path cuts each group's held rows."""
        c, is_eval = self.c, self._is_eval_group(g)
        part = self.eval if is_eval else self._part(g)
        part.builder = self._builder()
        held_part = None if is_eval else self.eval
        if held_part is not None:
            held_part.builder = self._builder()
        held = None if is_eval else self._held(group)
        split_rows = held is not None and len(held) == 0
        seen, read, kept = set(), 0, 0
        if resume is not None and resume.get("carry"):
            read, kept = resume["read"], resume["kept"]
            self._restore(resume["carry"], part, held_part, seen)
        base = self.records - read
        limit = 0 if is_eval else c.max_train_records
        records = itertools.islice(self._records(group, limit), read, None)
        # As in memory: data.dedupe applies to the training records (data.eval is read as it is).
        results = self.tokenizers.map(self._jobs(records, held, seen, read, kept, c.dedupe and not is_eval))
        for (train_out, held_out), position in results:
            read, kept = position
            for items, truncated, dropped in (train_out, held_out):
                self.truncated, self.dropped = self.truncated + truncated, self.dropped + dropped
                self.tokens_in += sum(len(x if c.format == "text" else x[0]) for x in items)
            part.add(train_out[0])
            if held_part is not None:
                held_part.add(held_out[0])
            self.records = base + read
            self._tick()
            if len(part.pending) >= self.shard_rows and not split_rows:
                self._checkpoint(g, read, kept, part, held_part, seen)
        part.finish()
        if held_part is not None:
            held_part.finish()
        if split_rows:
            self._split_rows(part, held_part)
        part.write()
        if held_part is not None:
            held_part.write()
        self._save_progress(g + 1, 0, 0, None)

    def _part(self, g: int) -> Part:
        while len(self.parts) <= g:
            self.parts.append(Part(self.out, f"train{len(self.parts)}", self._builder()))
        return self.parts[g]

    def _jobs(self, records, held, seen, read: int, kept: int, dedupe: bool):
        """Chunks of records as (train records, held-out records) jobs tagged with the (read, kept)
        counts after them; repeated records dropped with ``dedupe``."""
        c = self.c
        for chunk in chunks(records, c):
            train, out = [], []
            for record in chunk:
                read += 1
                if dedupe:
                    d = _digest(record[0])
                    if d in seen:
                        continue
                    seen.add(d)
                (out if held is not None and len(held) and held[kept] else train).append(record)
                kept += 1
            yield (train, out), (read, kept)

    def _split_rows(self, part: Part, held_part: Part) -> None:
        """A single text document held out by rows, as the in-memory path does."""
        rows = part.pending
        order = np.random.default_rng(self.seed).permutation(len(rows))
        n = max(1, int(round(len(rows) * self.c.eval_fraction)))
        held, kept = set(order[:n].tolist()), np.sort(order[n:])
        held_part.pending += [rows[i] for i in sorted(held)]
        part.pending = [rows[i] for i in kept]

    # -- progress ----------------------------------------------------------------------------------------
    def _tick(self) -> None:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        self.bar.n = self.records
        self.bar.set_postfix_str(f"{self.tokens_in / seconds:,.0f} tokens/s", refresh=False)
        self.bar.refresh()

    def _checkpoint(self, g, read, kept, part, held_part, seen) -> None:
        part.write()
        if held_part is not None:
            held_part.write()
        arrays = {f"train/{k}": v for k, v in part.builder.state().items()}
        if held_part is not None:
            arrays |= {f"held/{k}": v for k, v in held_part.builder.state().items()}
        if seen:
            arrays["seen"] = np.frombuffer(b"".join(sorted(seen)), np.uint8).reshape(-1, 16)
        name = f"carry-{g}-{read}.npz"
        np.savez(os.path.join(self.out, name + ".tmp.npz"), **arrays)
        os.replace(os.path.join(self.out, name + ".tmp.npz"), os.path.join(self.out, name))
        self._save_progress(g, read, kept, name)

    def _save_progress(self, g, read, kept, carry) -> None:
        state = {
            "key": self.key,
            "group": g,
            "read": read,
            "kept": kept,
            "carry": carry,
            "parts": [p.saved() for p in self.parts],
            "eval": self.eval.saved(),
            "records": self.records,
            "truncated": self.truncated,
            "dropped": self.dropped,
        }
        _write_json(os.path.join(self.out, PROGRESS), state)
        for old in glob.glob(os.path.join(self.out, "carry-*.npz")):
            if os.path.basename(old) != carry:
                os.remove(old)

    def _restore(self, carry: str, part: Part, held_part: Part | None, seen: set) -> None:
        with np.load(os.path.join(self.out, carry)) as saved:
            arrays = dict(saved)
        part.builder.restore({k[6:]: v for k, v in arrays.items() if k.startswith("train/")})
        if held_part is not None:
            held_part.builder.restore({k[5:]: v for k, v in arrays.items() if k.startswith("held/")})
        seen.update(bytes(row) for row in arrays.get("seen", np.zeros((0, 16), np.uint8)))

    def _clean(self, state: dict) -> None:
        """Remove what an interrupted prepare wrote after its last progress: shards not listed there
        and half-written files."""
        listed = {
            s["file"] for p in state["parts"] + [state.get("eval") or {"shards": []}] for s in p["shards"]
        }
        for path in glob.glob(os.path.join(self.out, "*")):
            name = os.path.basename(path)
            if (
                name.endswith(".tmp")
                or name.endswith(".tmp.npz")
                or (name.endswith(".arrayrecord") and name not in listed)
            ):
                os.remove(path)

    def _index(self) -> dict:
        if self.truncated or self.dropped:
            data.report_too_long(self.truncated, self.dropped, self.records, self.c)
        parts = [p.saved() for p in self.parts]
        if not parts or not sum(p["rows"] for p in parts):
            raise DataError(
                f"config key data.train = {self.c.train!r}: no training rows came out; check the sources"
            )
        index = self.described | {
            "key": self.key,
            "parts": parts,
            "eval": self.eval.saved() if self.eval.rows else None,
            "records": self.records,
            "truncated": self.truncated,
            "dropped": self.dropped,
            "tokens": sum(p["tokens"] for p in parts),
            "rows": sum(p["rows"] for p in parts),
        }
        _write_json(os.path.join(self.out, shards.INDEX), index)
        os.remove(os.path.join(self.out, PROGRESS))
        seconds = time.perf_counter() - self.start
        log.info(
            "prepared %s: %d records -> %d training rows (%s tokens), %d eval rows, in %.1f s (%s tokens/s)",
            self.out,
            self.records,
            index["rows"],
            f"{index['tokens']:,}",
            self.eval.rows,
            seconds,
            f"{self.tokens_in / max(seconds, 1e-9):,.0f}",
        )
        return index
