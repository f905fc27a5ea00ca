"""Sources -> token rows -> ArrayRecord shards (``python -m jaxtune.prepare``), resumable.

The rows are those the in-memory path (:func:`jaxtune.data.load`) makes from the same config and
seed, in the same order: the same groups (one per source with ``data.weights``), the same held-out
records (``data.eval_fraction``; dropped when ``data.eval`` is given, as in memory), the same dedupe,
cutting and packing (:class:`.packing.RowBuilder`). Records are read one at a time and tokenized a
chunk at a time (:mod:`.workers`), so memory does not grow with the corpus (but for ``data.dedupe``'s
16 bytes a record).

Resuming: each time the training rows pending reach a shard's worth, every pending row is written
(shards are complete files, renamed into place) and ``progress.json`` records how far the consumed
results got and the builders' carried state (``carry-*.npz``: the tokens of an unfinished row, a
packer's open rows; ``seen-*.npy``: the dedupe digests added since the checkpoint before). A rerun
of an interrupted prepare starts there and ends with the same shards and the same ``index.json`` as
an uninterrupted one; a rerun of a finished one does nothing.
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
from jaxtune.data.workers import Tokenizers, chunks
from jaxtune.errors import UsageError
from jaxtune.workdir import LOCK_NAME, Lock

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
        "sources": [fingerprint(_absolute(s), c.split, c.data_dir) for s in train],
        "eval_sources": [fingerprint(_absolute(s), c.eval_split, c.data_dir) for s in evals],
    }


def _absolute(source: str) -> str:
    """A local path made absolute, so a rerun from another folder sees the same inputs."""
    return source if source.startswith(("tfds:", "hf:")) else os.path.abspath(source)


def _key(described: dict) -> str:
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _write_json(path: str, value: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, default=str)
    os.replace(tmp, path)


def _differs(old: dict, new: dict) -> str:
    return next((key for key in new if old.get(key) != new[key]), "version")


class Part:
    """The shards of one row set (a training group, or the eval rows). Each group lays its rows out
    with a builder of its own (``builder``, set per group); rows wait in ``pending`` until written, in
    shards of at most ``shard_rows`` rows."""

    def __init__(self, out: str, name: str, shard_rows: int, saved: dict | None = None):
        self.out, self.name, self.shard_rows = out, name, shard_rows
        self.builder: RowBuilder | None = None
        saved = saved or {"shards": [], "rows": 0, "tokens": 0}
        self.shards, self.rows, self.tokens = list(saved["shards"]), saved["rows"], saved["tokens"]
        self.pending: list = []

    def add(self, items) -> None:
        for item in items:
            self.pending += self.builder.add(item)

    def finish(self) -> None:
        self.pending += self.builder.flush()

    def write(self) -> None:
        pending, self.pending = self.pending, []
        for at in range(0, len(pending), self.shard_rows):
            self._write_rows(self.builder.arrays(pending[at : at + self.shard_rows]))

    def _write_rows(self, rows: dict) -> None:
        name = f"{self.name}-{len(self.shards):05d}.arrayrecord"
        size = shards.write_shard(os.path.join(self.out, name), rows)
        n = len(rows["tokens"])
        self.shards.append({"file": name, "rows": n, "bytes": size})
        self.rows += n
        self.tokens += int(rows["mask"].sum())

    def saved(self) -> dict:
        return {"shards": self.shards, "rows": self.rows, "tokens": self.tokens}


def _digest(record: dict, c) -> bytes:
    """16 bytes of the in-memory dedupe's key (:func:`jaxtune.data.record_key`)."""
    return hashlib.blake2b(data.record_key(record, c).encode(), digest_size=16).digest()


class Group:
    """One training group's (or the eval sources') records and how they are split: ``held`` (a bool
    per kept record: held out) or ``split_rows`` (a single text document: its rows are split)."""

    def __init__(self, sources: list, is_eval: bool, held=None, split_rows: bool = False):
        self.sources, self.is_eval, self.held, self.split_rows = sources, is_eval, held, split_rows


class Prepare:
    """One prepare of ``config.data`` into ``out``: :meth:`run` does it, or finishes an interrupted one."""

    def __init__(self, c, tokenizer, out: str, seed: int, workers: int = 0, shard_rows: int = 0):
        self.c, self.tokenizer, self.out, self.seed = c, tokenizer, out, seed
        self.workers = workers or c.workers
        self.described = describe(c, tokenizer, seed)
        self.key = _key(self.described)
        width, packed = c.seq_len + 1, self.described["packing"]
        self.shard_rows = shard_rows or max(1, SHARD_BYTES // (width * (10 if packed else 6)))
        self.eos = tokenizer.eos_token_id
        self.tokens_in = 0

    # -- what is there already ---------------------------------------------------------------------------
    def _existing(self) -> dict | None:
        """The index if ``out`` is prepared from these inputs already (None: work to do); a DataError if
        it holds data of other inputs, or files that are not an unfinished prepare's."""
        index_path = os.path.join(self.out, shards.INDEX)
        if os.path.exists(index_path):
            index = shards.read_index(self.out)
            if index.get("key") == self.key:
                return index
            raise DataError(
                f"{index_path}: prepared from other inputs ({_differs(index, self.described)} differs); "
                "use another --out, or delete the folder to prepare it again"
            )
        mine = os.path.exists(os.path.join(self.out, PROGRESS))
        if os.path.isdir(self.out) and not mine:
            others = [f for f in os.listdir(self.out) if f != LOCK_NAME]
            if others:
                raise DataError(
                    f"{self.out}: not empty and not a prepare's folder ({others[0]}); "
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
        if "://" in self.out:
            raise UsageError(
                f"--out {self.out}: prepare writes a local folder (or a mounted bucket); copy it to the "
                "bucket afterwards"
            )
        os.makedirs(self.out, exist_ok=True)
        with Lock(self.out, flag="--out"):  # two prepares of one folder would race on its files
            return self._run(progress_bar)

    def _run(self, progress_bar: bool) -> dict:
        done = self._existing()
        if done is not None:
            log.info("%s is prepared already from these inputs: nothing to do", self.out)
            return done
        state = self._progress()
        if state is None:  # marks the folder as this prepare's before its first shard lands in it
            state = {"key": self.key, "group": 0, "read": 0, "kept": 0, "parts": []}
            _write_json(os.path.join(self.out, PROGRESS), state)
        self._clean(state)
        if state["group"] or state["read"]:
            log.info(
                "resuming the prepare of %s at group %d, record %d", self.out, state["group"], state["read"]
            )
        from tqdm import tqdm

        self.bar = tqdm(desc="prepare", unit=" records", disable=not progress_bar, mininterval=1.0)
        self.start = time.perf_counter()
        self.records = state.get("records", 0)
        self.truncated, self.dropped = state.get("truncated", 0), state.get("dropped", 0)
        self.parts = [Part(self.out, f"train{i}", self.shard_rows, p) for i, p in enumerate(state["parts"])]
        self.eval = Part(self.out, "eval", self.shard_rows, state.get("eval"))
        sources = self._sources()
        with Tokenizers(self.tokenizer, self.c, self.workers) as tokenizers:
            self.tokenizers = tokenizers
            for g in range(state["group"], len(sources)):
                self._group(g, self._split(sources[g], g), state if g == state["group"] else None)
        self.bar.close()
        return self._index()

    def _sources(self) -> list:
        """Lists of (source, split): the training groups, then the eval sources as the last one."""
        c = self.c
        train = [(s, c.split) for s in expand(c.train, "data.train")]
        groups = [[s] for s in train] if c.weights else [train]
        self.eval_group = len(groups) if c.eval else None
        return groups + ([[(s, c.eval_split) for s in expand(c.eval, "data.eval")]] if c.eval else [])

    def _records(self, sources, limit: int = 0):
        out = itertools.chain.from_iterable(iterate(s, split, self.c.data_dir) for s, split in sources)
        return itertools.islice(out, limit) if limit else out

    def _split(self, sources, g: int) -> Group:
        """The group's held-out records (``data.eval_fraction``), as the in-memory path picks them: a
        seeded permutation of the group's record count, found by a first pass over the records."""
        c = self.c
        if g == self.eval_group:
            return Group(sources, is_eval=True)
        if not c.eval_fraction:
            return Group(sources, is_eval=False)
        records = (record for record, _ in self._records(sources, c.max_train_records))
        n = len({_digest(r, c) for r in records}) if c.dedupe else sum(1 for _ in records)
        if c.format == "text" and n < 2:
            return Group(sources, is_eval=False, split_rows=True)  # one document: its rows are split
        held = np.zeros(n, bool)
        held[data.held_out(n, c.eval_fraction, self.seed)[1]] = True
        return Group(sources, is_eval=False, held=held)

    def _group(self, g: int, group: Group, resume: dict | None) -> None:
        """Rows of one group into its part; its held-out rows into the eval part through a builder of
        their own, as the in-memory path cuts each group's held rows (with ``data.eval`` given, the
        held-out records are left out, as in memory)."""
        c = self.c
        part = self.eval if group.is_eval else self._part(g)
        part.builder = RowBuilder(c, self.eos)
        held_part = None if group.is_eval or c.eval else self.eval
        if held_part is not None:
            held_part.builder = RowBuilder(c, self.eos)
        read, kept, seen = 0, 0, set()
        self.seen_files, self.counts = [], {"truncated": 0, "dropped": 0}
        if resume is not None and resume["read"]:
            read, kept = resume["read"], resume["kept"]
            self.seen_files, self.counts = list(resume["seen"]), dict(resume["counts"])
            self._restore(resume, part, held_part, seen)
        self._saved_seen = set(seen)
        base = self.records - read
        limit = 0 if group.is_eval else c.max_train_records
        records = itertools.islice(self._records(group.sources, limit), read, None)
        committed = set(seen)  # the digests of records whose results are in: what a checkpoint saves
        # As in memory: data.dedupe applies to the training records (data.eval is read as it is).
        jobs = self._jobs(records, group.held, seen, read, kept, c.dedupe and not group.is_eval)
        for (train_out, held_out), (read, kept, added) in self.tokenizers.map(jobs):
            committed.update(added)
            for items, truncated, dropped in (train_out, held_out):
                self.counts["truncated"] += truncated
                self.counts["dropped"] += dropped
                self.tokens_in += sum(len(x if c.format == "text" else x[0]) for x in items)
            part.add(train_out[0])
            if held_part is not None:
                held_part.add(held_out[0])
            self.records = base + read
            self._tick()
            if len(part.pending) >= self.shard_rows and not group.split_rows:
                self._checkpoint(g, read, kept, part, held_part, committed)
        part.finish()
        if held_part is not None:
            held_part.finish()
        if group.split_rows:
            self._split_rows(part, held_part)
        self._report(group, part, kept)
        part.write()
        if held_part is not None:
            held_part.write()
        self._save_progress(g + 1, 0, 0, None)

    def _part(self, g: int) -> Part:
        while len(self.parts) <= g:
            self.parts.append(Part(self.out, f"train{len(self.parts)}", self.shard_rows))
        return self.parts[g]

    def _jobs(self, records, held, seen, read: int, kept: int, dedupe: bool):
        """Chunks of records as (train records, held-out records) jobs tagged with the (read, kept)
        counts after them and the dedupe digests they added; repeated records dropped with ``dedupe``
        (``seen`` runs ahead of the results by the chunks in flight)."""
        for chunk in chunks(records, self.c):
            train, out, added = [], [], []
            for record in chunk:
                read += 1
                if dedupe:
                    d = _digest(record[0], self.c)
                    if d in seen:
                        continue
                    seen.add(d)
                    added.append(d)
                (out if held is not None and held[kept] else train).append(record)
                kept += 1
            yield (train, out), (read, kept, added)

    def _split_rows(self, part: Part, held_part: Part | None) -> None:
        """A single text document held out by rows, as the in-memory path does."""
        rows = part.pending
        kept, held = data.held_out(len(rows), self.c.eval_fraction, self.seed)
        if held_part is not None:
            held_part.pending += [rows[i] for i in held]
        part.pending = [rows[i] for i in kept]

    def _report(self, group: Group, part: Part, examples: int) -> None:
        """The in-memory path's log line on examples too long for a row, per group (``examples``: the
        group's records after dedupe); a group whose examples were all dropped is an error there, and
        here."""
        truncated, dropped = self.counts["truncated"], self.counts["dropped"]
        self.truncated += truncated
        self.dropped += dropped
        data.report_too_long(truncated, dropped, examples, self.c)
        if not group.is_eval and not (part.pending or part.rows):
            names = ", ".join(s for s, _ in group.sources)
            raise DataError(f"{names}: no training rows came out; check the sources and data.seq_len")

    # -- progress ----------------------------------------------------------------------------------------
    def _tick(self) -> None:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        self.bar.n = self.records
        self.bar.set_postfix_str(f"{self.tokens_in / seconds:,.0f} tokens/s", refresh=False)
        self.bar.refresh()

    def _checkpoint(self, g, read, kept, part, held_part, committed) -> None:
        part.write()
        if held_part is not None:
            held_part.write()
        arrays = {f"train/{k}": v for k, v in part.builder.state().items()}
        if held_part is not None:
            arrays |= {f"held/{k}": v for k, v in held_part.builder.state().items()}
        carry = f"carry-{g}-{read}.npz"
        self._save_array(carry, lambda path: np.savez(path, **arrays))
        new = committed - self._saved_seen
        if new:  # only the digests added since the last checkpoint: the set is written once in all
            name = f"seen-{g}-{read}.npy"
            digests = np.frombuffer(b"".join(sorted(new)), np.uint8).reshape(-1, 16)
            self._save_array(name, lambda path: np.save(path, digests))
            self.seen_files.append(name)
            self._saved_seen |= new
        self._save_progress(g, read, kept, carry)

    def _save_array(self, name: str, save) -> None:
        tmp = os.path.join(self.out, f"{name}.tmp{os.path.splitext(name)[1]}")
        save(tmp)
        os.replace(tmp, os.path.join(self.out, name))

    def _save_progress(self, g, read, kept, carry) -> None:
        if carry is None:  # a group is done: its dedupe set goes
            self.seen_files = []
        state = {
            "key": self.key,
            "group": g,
            "read": read,
            "kept": kept,
            "carry": carry,
            "seen": self.seen_files,
            "parts": [p.saved() for p in self.parts],
            "eval": self.eval.saved(),
            "records": self.records,
            "truncated": self.truncated,
            "dropped": self.dropped,
            "counts": self.counts,
        }
        _write_json(os.path.join(self.out, PROGRESS), state)
        keep = {carry, *self.seen_files}
        for old in glob.glob(os.path.join(self.out, "carry-*.npz")) + glob.glob(
            os.path.join(self.out, "seen-*.npy")
        ):
            if os.path.basename(old) not in keep:
                os.remove(old)

    def _restore(self, resume: dict, part: Part, held_part: Part | None, seen: set) -> None:
        with np.load(os.path.join(self.out, resume["carry"])) as saved:
            arrays = dict(saved)
        part.builder.restore({k[6:]: v for k, v in arrays.items() if k.startswith("train/")})
        if held_part is not None:
            held_part.builder.restore({k[5:]: v for k, v in arrays.items() if k.startswith("held/")})
        for name in resume["seen"]:
            seen.update(bytes(row) for row in np.load(os.path.join(self.out, name)))

    def _clean(self, state: dict) -> None:
        """Remove what an interrupted prepare wrote after its last progress: shards not listed there
        and half-written files (only in a folder that holds a prepare's progress, or nothing else)."""
        listed = {
            s["file"] for p in [*state["parts"], state.get("eval") or {"shards": []}] for s in p["shards"]
        }
        listed |= {state.get("carry"), *state.get("seen", [])}
        for path in glob.glob(os.path.join(self.out, "*")):
            name = os.path.basename(path)
            ours = name.endswith((".arrayrecord", ".tmp", ".tmp.npz", ".tmp.npy"))
            ours = ours or (name.startswith(("carry-", "seen-")) and name.endswith((".npz", ".npy")))
            if ours and name not in listed:
                os.remove(path)

    def _index(self) -> dict:
        parts = [p.saved() for p in self.parts]
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
            "prepared %s: %d records -> %d training rows (%s tokens), %d eval rows; this run tokenized %s "
            "tokens in %.1f s",
            self.out,
            self.records,
            index["rows"],
            f"{index['tokens']:,}",
            self.eval.rows,
            f"{self.tokens_in:,}",
            seconds,
        )
        return index
