"""The step meter: each training step's loss, learning rate, tokens/s and MFU, to the progress bar and
``metrics.jsonl``.

Metrics are fetched one step late, so the device is never idle waiting for the host. A step's time is
the wall time since the clock was last read; compiling, evaluating and saving restart the clock, so
none of them counts as a step's time. Before an eval or a save the last two steps are reported
together, their time shared in proportion to their FLOPs. Where a step runs inside its dispatch (one
CPU device: jaxtune.hostmem), it has ended when it is recorded, so it is reported at once, with its
own time.
"""

from __future__ import annotations

import logging
import math
import time

import jax

log = logging.getLogger("jaxtune.train")


class NonFiniteLoss(Exception):
    """A step's loss is NaN or infinite (the loop stops the run, naming the last good checkpoint)."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"loss is {loss} at step {step}")
        self.step, self.loss = step, loss


class StepMeter:
    """``cost(length) -> (tokens, FLOPs)`` of a step whose rows are ``length`` long (the step's
    ``tokens`` metric, its non-padding tokens, takes the place of the first when it has one);
    ``peak``: the FLOP/s of all devices (0: no MFU); ``writer``: a MetricsWriter; ``bar``: a tqdm bar
    (or None).
    ``measured``: the peak was measured on this machine (a CPU), so it is a lower bound of the true
    one: a step that runs faster raises it, and MFU never reads above 100%.
    ``inline``: a step has run by the time it is recorded (see the module's doc).
    ``output_flops``: a language model's output-layer FLOPs per token; a step's ``output_tokens``
    metric (the tokens the loss took through that layer: it skips those after the last token with a
    loss) then takes the skipped tokens' share out of ``cost``'s FLOPs."""

    def __init__(
        self,
        cost,
        peak: float,
        log_every: int,
        total: int,
        writer,
        bar=None,
        clock=time.perf_counter,
        measured: bool = False,
        inline: bool = False,
        output_flops: float = 0.0,
    ):
        self.measured, self.inline, self.output_flops = measured, inline, output_flops
        self.cost, self.peak, self.log_every, self.total = cost, peak, log_every, total
        self.writer, self.bar, self.clock = writer, bar, clock
        self.started = clock()
        self.pending = None  # (step, device metrics, row length) not yet reported
        self.last = None  # (step, loss) of the last reported step

    def restart(self) -> None:
        """Start timing afresh: what happened since (a compile, an eval, a save) is no step's time."""
        self.started = self.clock()

    def exclude(self, seconds: float) -> None:
        """Take ``seconds`` (a compile in the middle of a step's time) out of the step being timed."""
        self.started += seconds

    def step(self, step: int, metrics, length: int, flush: bool = False) -> None:
        """Record a dispatched step. The step before it is reported now; with ``flush`` (an eval, a save
        or the end comes next) or ``inline`` this one is too. Raises NonFiniteLoss."""
        current = (step, metrics, length)
        if flush or self.inline:
            done = [p for p in (self.pending, current) if p is not None]
            self.pending = None
            self._report(done)
        else:
            previous, self.pending = self.pending, current
            if previous is not None:
                self._report([previous])

    def _cost(self, metrics: dict, length: int) -> tuple[int, float]:
        tokens, flops = self.cost(length)
        if "output_tokens" in metrics:
            flops -= self.output_flops * max(tokens - float(metrics["output_tokens"]), 0.0)
        return tokens, flops

    def _report(self, done: list) -> None:
        fetched = [(step, jax.device_get(m), length) for step, m, length in done]
        now = self.clock()
        seconds, self.started = now - self.started, now
        costs = [self._cost(m, length) for _, m, length in fetched]
        all_flops = sum(flops for _, flops in costs) or 1.0
        for (step, m, _), (tokens, flops) in zip(fetched, costs, strict=True):
            loss = float(m["loss"])
            if not math.isfinite(loss):
                raise NonFiniteLoss(step, loss)
            took = max(seconds * flops / all_flops, 1e-9)
            tps = float(m["tokens"]) / took if "tokens" in m else tokens / took
            if self.measured and flops / took > self.peak:
                log.info(
                    "step %d ran at %.1f GFLOP/s, above the measured peak of %.1f: that is the peak now",
                    step,
                    flops / took / 1e9,
                    self.peak / 1e9,
                )
                self.peak = flops / took
            util = flops / took / self.peak if self.peak else 0.0
            self.last = (step, loss)
            lr = float(m["learning_rate"])
            if self.bar is not None:
                self.bar.update(step - self.bar.n)
                self.bar.set_postfix(
                    loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}", mfu=f"{util:.1%}"
                )
            if step % self.log_every == 0 or step == self.total:
                self.writer.write(
                    step,
                    "train",
                    loss=loss,
                    learning_rate=lr,
                    tokens_per_second=tps,
                    step_seconds=took,
                    mfu=util,
                    grad_norm=float(m["grad_norm"]),
                )
