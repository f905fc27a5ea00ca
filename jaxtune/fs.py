"""Files of a run that may live on an object store: a local path, or a URL such as ``gs://bucket/run``.

Local paths keep the operating system's calls (atomic renames, appends). URLs go through
``etils.epath`` (gcsfs for ``gs://``, installed with ``pip install 'jaxtune[gcs]'``), which Orbax uses for
the checkpoints themselves. An object store has no rename, append or lock, so: a file is written in one
request (an object appears whole or not at all, which is what a temporary file and a rename give on a
disk); a directory that a library insists on writing locally (a tokenizer's files, safetensors, a
plot) is written to a local folder and uploaded (:func:`staged`); one it must read locally is
downloaded first (:func:`fetched`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile

from jaxtune.errors import UsageError


def is_url(path) -> bool:
    return "://" in os.fspath(path)


def _remote(path):
    from etils import epath

    # epath reaches gs:// through gcsfs, or through TensorFlow's gfile where TensorFlow is installed.
    missing = all(importlib.util.find_spec(m) is None for m in ("gcsfs", "tensorflow"))
    if os.fspath(path).startswith("gs://") and missing:
        raise UsageError(f"{path}: gs:// paths need gcsfs; pip install 'jaxtune[gcs]'")
    return epath.Path(path)


def absolute(path: str) -> str:
    """``path`` made absolute; a URL as it is."""
    path = os.fspath(path)
    return path if is_url(path) else os.path.abspath(path)


def exists(path: str) -> bool:
    return _remote(path).exists() if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _remote(path).is_dir() if is_url(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
    return _remote(path).is_file() if is_url(path) else os.path.isfile(path)


def listdir(path: str) -> list[str]:
    if is_url(path):
        return [p.name for p in _remote(path).iterdir()]
    return os.listdir(path)


def makedirs(path: str) -> None:
    if is_url(path):
        _remote(path).mkdir(parents=True, exist_ok=True)  # object stores have no folders: a no-op there
    else:
        os.makedirs(path, exist_ok=True)


def read_text(path: str) -> str:
    if is_url(path):
        return _remote(path).read_text(encoding="utf-8")
    with open(path, encoding="utf-8") as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    """Write ``path`` whole: locally through a temporary file and a rename, so a kill never leaves half
    of it; on an object store in one upload, which is whole or absent by itself."""
    if is_url(path):
        _remote(path).write_text(text, encoding="utf-8")
        return
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def remove(path: str) -> None:
    if is_url(path):
        _remote(path).unlink()
    else:
        os.remove(path)


def rmtree(path: str) -> None:
    if is_url(path):
        _remote(path).rmtree()
    else:
        shutil.rmtree(path)


def move(source: str, target: str) -> None:
    """Move a file or a directory tree (on an object store: copied object by object, then deleted)."""
    if not is_url(source) and not is_url(target):
        shutil.move(source, target)
        return
    copy_tree(source, target)
    rmtree(source) if isdir(source) else remove(source)


def copy_tree(source: str, target: str) -> None:
    """Copy a file, or every file under a directory, from and to local paths or URLs."""
    if not isdir(source):
        _copy_file(source, target)
        return
    makedirs(target)
    for name in listdir(source):
        copy_tree(os.path.join(source, name), os.path.join(target, name))


def _copy_file(source: str, target: str) -> None:
    if not is_url(source) and not is_url(target):
        shutil.copyfile(source, target)
        return
    reader = _remote(source).open("rb") if is_url(source) else open(source, "rb")  # noqa: SIM115
    with reader as src:
        writer = _remote(target).open("wb") if is_url(target) else open(target, "wb")  # noqa: SIM115
        with writer as dst:
            shutil.copyfileobj(src, dst, 16 << 20)


@contextlib.contextmanager
def staged(path: str, stale=None):
    """A local directory to write ``path``'s files into: ``path`` itself when it is local; for a URL, a
    temporary folder whose files are uploaded into ``path`` when the block ends without an error.
    ``stale(path)``: the names in the URL's directory that must not outlive the upload (an older
    model's weight shards, say); those the block did not write are deleted after it. Locally, the
    block's own code removes what it replaces."""
    if not is_url(path):
        yield path  # the block's own code makes the folder, on the process that writes
        return
    with tempfile.TemporaryDirectory(prefix="jaxtune-upload-") as local:
        yield local
        copy_tree(local, path)
        for name in set(stale(path) if stale else ()) - set(os.listdir(local)):
            target = os.path.join(path, name)
            rmtree(target) if isdir(target) else remove(target)


@contextlib.contextmanager
def fetched(path: str):
    """A local copy of the directory or file ``path`` for the block (``path`` itself when local)."""
    if not is_url(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="jaxtune-download-") as local:
        target = os.path.join(local, os.path.basename(path.rstrip("/")) or "root")
        if exists(path):
            copy_tree(path, target)
        yield target
