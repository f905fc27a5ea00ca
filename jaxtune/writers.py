"""Where a run's numbers go: ``workdir/metrics.jsonl`` (one JSON object per logged step) and TensorBoard
event files in the workdir. Only process 0 writes.

An object store (a ``gs://`` workdir) has no append: both are written to a local folder and uploaded
whole at most every ``UPLOAD_SECONDS`` and at the close."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time

import jax

from jaxtune import fs

log = logging.getLogger("jaxtune.train")

UPLOAD_SECONDS = 30.0


class MetricsWriter:
    """Appends to ``workdir/metrics.jsonl``. ``keep_until``: the step a run starts from; rows of later
    steps, written by a run that went further before it stopped, are dropped first, so a resumed run
    leaves one row per step and split (0: a fresh start, no rows kept)."""

    def __init__(self, workdir: str, keep_until: int = 0):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self.remote = workdir if fs.is_url(workdir) else None
        self.local = tempfile.mkdtemp(prefix="jaxtune-metrics-") if self.remote else workdir
        path = os.path.join(self.local, "metrics.jsonl")
        if self.remote and fs.exists(os.path.join(self.remote, "metrics.jsonl")):
            fs.copy_tree(os.path.join(self.remote, "metrics.jsonl"), path)
        _truncate(path, keep_until)
        self.jsonl = open(path, "a")  # noqa: SIM115 (closed in close())
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(logdir=self.local, flush_secs=10)
        self.uploaded = time.monotonic()
        if self.remote:
            self._upload()  # the truncation, at once: a resumed run's later rows are gone from the start

    def write(self, step: int, split: str, **values) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "split": split}
        for key, value in values.items():
            value = float(value)
            row[key] = value if math.isfinite(value) else str(value)  # JSON has no NaN or Inf
            if math.isfinite(value):
                self.tb.add_scalar(f"{split}/{key}", value, int(step))
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.remote and time.monotonic() - self.uploaded >= UPLOAD_SECONDS:
            try:
                self._upload()
            except Exception as e:  # noqa: BLE001 - a store's hiccup must not end the run: retried later
                self.uploaded = time.monotonic()
                log.warning(
                    "uploading the metrics to %s failed (%s); retrying in %.0f s",
                    self.remote,
                    e,
                    UPLOAD_SECONDS,
                )

    def _upload(self) -> None:
        self.tb.flush()
        for name in os.listdir(self.local):  # metrics.jsonl and this run's event files
            fs.copy_tree(os.path.join(self.local, name), os.path.join(self.remote, name))
        self.uploaded = time.monotonic()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
            if self.remote:
                try:
                    self._upload()
                except Exception as e:  # noqa: BLE001 - the local copy stays, and the message says where
                    log.error(
                        "uploading the metrics to %s failed (%s); they are in %s", self.remote, e, self.local
                    )
                    return
                shutil.rmtree(self.local, ignore_errors=True)


def _truncate(path: str, keep_until: int) -> None:
    """Keep the rows of steps up to ``keep_until`` (none at 0), rewriting the file through a rename."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
        if keep_until and step <= keep_until:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) == len(lines):
        return
    fs.write_text(path, "".join(kept))
