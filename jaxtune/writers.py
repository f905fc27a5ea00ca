"""Where a run's numbers go: ``workdir/metrics.jsonl`` (one JSON object per logged step) and TensorBoard
event files in the workdir. Only process 0 writes."""

from __future__ import annotations

import json
import math
import os

import jax


class MetricsWriter:
    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115 (closed in close())
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(logdir=workdir, flush_secs=10)

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

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
