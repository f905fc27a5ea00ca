"""The best tracker: follows one eval metric (``checkpoint.best_metric``), offers every eval's state to
the best-k checkpoints, and says when early stopping ends the run (``eval.patience`` evals without a
gain of more than ``eval.min_delta``). Its state goes into each checkpoint's meta and comes back on a
resume, so a resumed run stops where an uninterrupted one would.
"""

from __future__ import annotations

import logging

from jaxtune.errors import ConfigError

log = logging.getLogger("jaxtune.train")


class BestTracker:
    """``metric`` "" turns it off (no offers, never stops)."""

    def __init__(self, metric: str, mode: str = "max", min_delta: float = 0.0, patience: int = 0):
        self.metric, self.sign = metric, 1.0 if mode == "max" else -1.0
        self.min_delta, self.patience = min_delta, patience
        self.value = self.step = None  # the last value that counted as a gain, and its step
        self.bad = 0  # evals since then without one

    def state(self) -> dict:
        return {"value": self.value, "step": self.step, "bad": self.bad}

    def restore(self, state: dict) -> None:
        self.value, self.step, self.bad = state.get("value"), state.get("step"), state.get("bad", 0)

    def update(self, step: int, values: dict, offer=None) -> bool:
        """Follow the eval ``values`` of ``step``; ``offer(value)`` hands the state to the best-k
        checkpoints (step 0, the model before training, is not offered). True: stop early."""
        if not self.metric:
            return False
        if self.metric not in values:
            raise ConfigError(
                f"config key checkpoint.best_metric = {self.metric!r} is not an eval metric here; "
                f"use one of {', '.join(sorted(values))}"
            )
        value = values[self.metric]
        if self.value is None or self.sign * (value - self.value) > self.min_delta:
            self.value, self.step, self.bad = value, step, 0
        else:
            self.bad += 1
        if step and offer is not None:
            offer(value)
        stop = bool(self.patience) and self.bad >= self.patience
        if stop:
            log.info(
                "early stopping at step %d: %s has not improved on %.4f (step %s) for %d evals",
                step,
                self.metric,
                self.value,
                self.step,
                self.bad,
            )
        return stop
