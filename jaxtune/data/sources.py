"""Records (dicts) from wherever the data lives, each with its origin for error messages.

Local files by extension: ``.jsonl`` (an object a line), ``.json`` (an array of objects), ``.csv`` and
``.tsv`` (a header row; a TSV line is split on its last tabs, as GLUE files need), ``.parquet``,
``.txt`` / ``.md`` (one record ``{"text": <the file>}``), ``.yml`` / ``.yaml`` (chatterbot-corpus dialogs: one
record ``{"messages": [...]}`` a conversation). ``tfds:NAME[/CONFIG][:VERSION]`` reads a TFDS split
through ``tfds.data_source`` (ArrayRecord, no TensorFlow). ``hf:NAME`` or ``hf:/path/saved`` reads a
Hugging Face dataset (hub name, or a ``save_to_disk`` folder) when ``datasets`` is installed.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os

from jaxtune.errors import DataError, DataNotFound

log = logging.getLogger(__name__)
__all__ = ["DataError", "expand", "fingerprint", "iterate", "read"]


def expand(spec: str, key: str) -> list[str]:
    """The sources of a ``data.train`` / ``data.eval`` value: comma-separated paths, globs, ``tfds:`` or
    ``hf:`` names."""
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part.startswith(("tfds:", "hf:", "prepared:")):
            out.append(part)
            continue
        found = sorted(f for f in glob.glob(os.path.expanduser(part)) if os.path.isfile(f))
        if not found:
            where = key if key.startswith("--") else f"config key {key}"
            raise DataNotFound(f"{where}: {part!r} matches no file; check the path")
        out += found
    return out


def fingerprint(source: str, split: str = "train", data_dir: str = "") -> list:
    """What a source's records depend on, for caches and prepared data: a file's size and modification
    time; a TFDS dataset's version and the size and time of its prepared files; a Hugging Face
    dataset's fingerprint (``datasets`` hashes its content and history). A rebuilt dataset of the same
    name so gets a new fingerprint."""
    if source.startswith("prepared:"):  # its index names everything its rows depend on
        index = os.path.join(os.path.expanduser(source[len("prepared:") :]), "index.json")
        stat = os.stat(index) if os.path.exists(index) else None
        return [source, stat and stat.st_size, stat and stat.st_mtime_ns]
    if source.startswith("tfds:"):
        return [source, split, *_tfds_version(source[5:], data_dir)]
    if source.startswith("hf:"):
        return [source, split, _hf_fingerprint(source[3:], split)]
    stat = os.stat(source)
    return [source, stat.st_size, stat.st_mtime_ns]


def _tfds_version(name: str, data_dir: str) -> list:
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
        files = sorted(glob.glob(os.path.join(builder.data_dir, "*")))
    except Exception as e:  # tfds raises several types for a missing dataset
        raise DataError(f"tfds:{name}: not found ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    stats = [(os.path.basename(f), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]
    return [str(builder.info.version), stats]


def _hf_fingerprint(name: str, split: str) -> str:
    if os.path.isdir(name):  # a save_to_disk folder: its state.json (per split in a DatasetDict)
        for state in (os.path.join(name, split, "state.json"), os.path.join(name, "state.json")):
            if os.path.exists(state):
                with open(state, encoding="utf-8") as f:
                    return str(json.load(f).get("_fingerprint"))
    ds = _hf_dataset(name, split)
    return str(getattr(ds, "_fingerprint", None))


def read(source: str, split: str = "train", data_dir: str = "") -> list[tuple[dict, str]]:
    """(record, origin) pairs of one source; ``origin`` is ``file:line`` or ``name[index]``."""
    return list(iterate(source, split, data_dir))


READERS = {}  # extension -> reader, filled below


def iterate(source: str, split: str = "train", data_dir: str = ""):
    """:func:`read` one record at a time: a JSONL, CSV or TSV file, a TFDS split or a Hugging Face
    dataset is never held whole (the other formats are one document each, or parsed whole)."""
    if source.startswith("prepared:"):
        raise DataError(
            f"{source}: prepared rows are read by training from data.train alone; name the raw sources here"
        )
    if source.startswith("tfds:"):
        records = _tfds(source[5:], split, data_dir)
    elif source.startswith("hf:"):
        records = _hf(source[3:], split)
    else:
        ext = os.path.splitext(source)[1].lower()
        if ext not in READERS:
            raise DataError(
                f"{source}: unknown file type {ext!r}; use {', '.join(READERS)}, tfds:NAME or hf:NAME"
            )
        if os.path.getsize(source) == 0:
            raise DataError(f"{source}: the file is empty; remove it from the data or fill it")
        records = READERS[ext](source)
    empty = True
    for record in records:
        empty = False
        yield record
    if empty:
        raise DataError(f"{source}: holds no records; remove it from the data or fill it")


def _not_utf8(path: str, line: int, byte: int, offset: int) -> DataError:
    return DataError(
        f"{path}:{line}: not UTF-8 text (byte 0x{byte:02x} at offset {offset}); "
        "save the file as UTF-8, or remove it from the data if it is not text"
    )


def text_of(path: str) -> str:
    """The whole file as text, line endings made ``\\n`` (as ``open`` in text mode does); bytes that are
    not UTF-8 are a DataError naming the line and byte offset."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, raw.count(b"\n", 0, e.start) + 1, raw[e.start], e.start) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def lines_of(path: str, keep_ends: bool = False):
    """(line number, text) of each line, decoded one at a time so a large file is never held whole;
    ``keep_ends``: line endings as they are (csv reads them itself), else without ``\\r\\n`` / ``\\n``."""
    offset = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, n, raw[e.start], offset + e.start) from None
            offset += len(raw)
            yield n, line if keep_ends else line.rstrip("\r\n")


def _json_reason(e: json.JSONDecodeError) -> str:
    # Some of json's messages end in "at" ("Invalid control character at"): the column follows once.
    return f"{e.msg.removesuffix(' at')} at column {e.colno}"


def _jsonl(path):
    for n, line in lines_of(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({_json_reason(e)}); fix or remove the line") from e
        if not isinstance(record, dict):
            raise DataError(f"{path}:{n}: a JSON {type(record).__name__}, not an object with named fields")
        yield record, f"{path}:{n}"


def _json(path):
    try:
        data = json.loads(text_of(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({_json_reason(e)}); fix the file") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, got a {type(data).__name__}")
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {i} is a {type(record).__name__}, not an object")
    return [(record, f"{path}[{i}]") for i, record in enumerate(data)]


def _csv(path):
    """Rows as records of the header's fields, each named by its first line. A row with more or fewer
    fields than the header is an error: csv would file the extra fields under the key None (or fill the
    missing ones with None), and a field shifted that way becomes, say, a new label."""
    reader = csv.DictReader(line for _, line in lines_of(path, keep_ends=True))
    try:
        if reader.fieldnames is None:  # reads the header; none: no records
            return
        while True:
            n = reader.line_num + 1  # a quoted field may span lines: the record starts on the next one
            row = next(reader, None)
            if row is None:
                return
            width = len(reader.fieldnames)
            if None in row:
                raise DataError(
                    f"{path}:{n}: {width + len(row[None])} comma-separated fields where the header has "
                    f'{width}; quote fields that contain commas ("a, b") or fix the row'
                )
            if any(v is None for v in row.values()):
                got = sum(v is not None for v in row.values())
                raise DataError(f"{path}:{n}: {got} fields where the header has {width}; fix the row")
            yield row, f"{path}:{n}"
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({e}); fix the row") from e


def _tsv(path):
    """Split on the last tabs so that a tab inside the first column's text survives (GLUE files)."""
    lines = lines_of(path)
    header = next(lines, (1, ""))[1].split("\t")
    for n, line in lines:
        if not line:
            continue
        values = line.rsplit("\t", len(header) - 1)
        if len(values) != len(header):
            raise DataError(
                f"{path}:{n}: {len(values)} tab-separated fields where the header has {len(header)}"
            )
        yield dict(zip(header, values, strict=True)), f"{path}:{n}"


def _parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e}); write it again or remove it") from e
    return [(row, f"{path}[{i}]") for i, row in enumerate(table.to_pylist())]


def _txt(path):
    text = text_of(path)
    if not text.strip():
        raise DataError(f"{path}: the file holds only whitespace")
    return [({"text": text}, path)]


def _yaml(path):
    """chatterbot-corpus dialogs: alternating user / assistant utterances (``messages``), with the
    file's first category as ``topic`` and the opening utterance as ``utterance`` (topic
    classification)."""
    import yaml

    try:
        doc = yaml.safe_load(text_of(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise DataError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e}); fix the file") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("conversations"), list):
        raise DataError(f"{path}: not a chatterbot dialog file (no 'conversations' list)")
    out, skipped = [], []
    roles = ("user", "assistant")
    categories = doc.get("categories") or [os.path.splitext(os.path.basename(path))[0]]
    for i, conv in enumerate(doc["conversations"]):
        if isinstance(conv, list) and len(conv) >= 2 and all(isinstance(u, str) for u in conv):
            messages = [{"role": roles[j % 2], "content": u} for j, u in enumerate(conv)]
            record = {"messages": messages, "topic": str(categories[0]), "utterance": conv[0]}
            out.append((record, f"{path}[{i}]"))
        else:
            skipped.append(str(i))
    if skipped:
        # The published corpus has a few malformed entries (a bare string where a dialog should be).
        log.warning(
            "%s: skipped conversation(s) %s: not lists of two or more strings", path, ", ".join(skipped)
        )
    return out


def _decode(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if hasattr(value, "tolist"):
        value = value.tolist()
        return value.decode("utf-8") if isinstance(value, bytes) else value
    return value


def _tfds(name: str, split: str, data_dir: str):
    import tensorflow_datasets as tfds

    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:  # tfds raises several types for a missing dataset
        where = data_dir or "the default TFDS data_dir"
        reason = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        raise DataError(
            f"tfds:{name} split {split!r}: not prepared in {where} ({reason}); "
            "build it with tfds (file_format='array_record') or set data.data_dir"
        ) from e
    return (
        ({k: _decode(v) for k, v in source[i].items()}, f"tfds:{name}[{split}][{i}]")
        for i in range(len(source))
    )


def _hf(name: str, split: str):
    ds = _hf_dataset(name, split)
    return ((dict(row), f"hf:{name}[{split}][{i}]") for i, row in enumerate(ds))


def _hf_dataset(name: str, split: str):
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"hf:{name}: the 'datasets' package is not installed; pip install datasets") from e
    try:
        if os.path.isdir(name):
            ds = datasets.load_from_disk(name)
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types: missing split, offline hub, bad folder
        raise DataError(
            f"hf:{name} split {split!r}: cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "pass a save_to_disk folder, check the split name, or go online"
        ) from e
    return ds


READERS.update(
    {
        ".jsonl": _jsonl,
        ".json": _json,
        ".csv": _csv,
        ".tsv": _tsv,
        ".parquet": _parquet,
        ".txt": _txt,
        ".md": _txt,
        ".yml": _yaml,
        ".yaml": _yaml,
    }
)
