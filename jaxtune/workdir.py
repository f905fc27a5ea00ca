"""One run per workdir: an exclusive lock held for the run's life.

The lock is ``flock`` on ``WORKDIR/.lock``: the kernel releases it when the holding process ends, however
it ends (kill -9 included), so a lock left by a dead run never blocks the next one. The file names the
holder (pid, host, start time) for the message a second run gets. On a pod, process 0 holds it.
Network file systems may not honour ``flock``; there the lock is only as good as theirs. An object
store (a ``gs://`` workdir) has none at all: there the workdir is not locked.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time

from jaxtune import fs
from jaxtune.errors import WorkdirBusy

LOCK_NAME = ".lock"
log = logging.getLogger(__name__)


class Lock:
    """``with Lock(workdir):`` holds the workdir for the block, or raises WorkdirBusy naming the holder."""

    def __init__(self, workdir: str, enabled: bool = True, flag: str = "--workdir"):
        self.url = fs.is_url(workdir)
        if self.url:
            # An object store has no lock: one run per workdir is the user's to keep there.
            enabled = False
            log.info("%s: an object store has no file locks; the workdir is not locked", workdir)
        self.path = os.path.join(workdir if self.url else os.path.abspath(workdir), LOCK_NAME)
        self.enabled, self.flag = enabled, flag
        self._fd = None

    def __enter__(self):
        if not self.enabled:
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if not isinstance(e, BlockingIOError):  # no locks on this file system (ENOLCK on NFS, say)
                os.close(fd)
                log.warning(
                    "%s: the file system refused a lock (%s); the run goes on without one", self.path, e
                )
                return self
            holder = _holder(fd)
            os.close(fd)
            raise WorkdirBusy(
                f"{os.path.dirname(self.path)} is in use by another run ({holder}); wait for it to end or "
                f"stop it, or pass another {self.flag}"
            ) from None
        os.ftruncate(fd, 0)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.write(fd, json.dumps(record).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {record['pid']} on {record['host']}, started {record['started']}"
    except (ValueError, KeyError, OSError):
        return "a process that has not written its name yet"
