"""Stopping a run from outside: SIGTERM (how TPU VMs and schedulers preempt) and SIGINT (Ctrl-C).

The first signal asks the loop to finish its step, save and exit. A second one, or a stop still not done
``timeout_s`` seconds after the first, ends the process at once with one line naming the last complete
checkpoint and status 128 + the signal's number: a run stuck in a step or a save can always be stopped.

Python runs signal handlers only in the main thread and only between bytecodes, so a main thread stuck
inside XLA or Orbax would never see the second signal. The signals are therefore also written to a pipe
(``signal.set_wakeup_fd``) that a watcher thread reads: it counts them whatever the main thread is doing.

On a pod, the signal may reach one host only (a maintenance event): every step, the processes agree on
whether any of them was asked to stop, so all of them save the same step and exit together.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import numpy as np

from jaxtune import fs

log = logging.getLogger("jaxtune.train")
SIGNALS = (signal.SIGTERM, signal.SIGINT)
_STOP_WATCHING = 0  # a byte no signal has: tells the watcher to end


def last_complete_step(checkpoint_dir: str) -> str:
    """The newest finished checkpoint, read from the directory names (no Orbax call: the thread that
    asks may run while Orbax is stuck)."""
    if fs.is_url(checkpoint_dir):  # no network call on the way out: the store may be what hangs
        return f"see {checkpoint_dir}"
    try:
        steps = [int(n) for n in os.listdir(checkpoint_dir) if n.isdigit()]
    except OSError:
        steps = []
    return f"step {max(steps)} in {checkpoint_dir}" if steps else f"none in {checkpoint_dir}"


class StopSignals:
    """``with StopSignals(timeout_s, checkpoint_dir) as stop:`` ... ``if stop.requested:`` save and end."""

    def __init__(self, timeout_s: float, checkpoint_dir: str):
        self.timeout_s = timeout_s
        self.checkpoint_dir = checkpoint_dir
        self.requested = None  # the signal's name once one came
        self._previous = {}
        self._pipe = None
        self._old_fd = -1
        self._timer = None
        self._exchange = None

    def __enter__(self):
        try:
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread (a run inside a test's thread): no signal handling
            self._previous = {}
            return self
        read, write = os.pipe()
        os.set_blocking(write, False)
        self._pipe = (read, write)
        self._old_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._watcher = threading.Thread(target=self._watch, name="jaxtune-stop-signals", daemon=True)
        self._watcher.start()
        return self

    def _handle(self, signum, frame):
        # The watcher thread has the count; the main thread only needs the flag, at once.
        if self.requested is None:
            self.requested = signal.Signals(signum).name

    def _watch(self):
        try:
            self._count()
        finally:
            os.close(self._pipe[0])

    def _count(self):
        count = 0
        while True:
            try:
                data = os.read(self._pipe[0], 64)
            except OSError:
                return
            for signum in data:
                if signum == _STOP_WATCHING:
                    return
                if signum not in SIGNALS:
                    continue
                count += 1
                name = signal.Signals(signum).name
                if count == 1:
                    self.requested = self.requested or name
                    log.warning(
                        "%s: finishing the current step, saving a checkpoint, then exiting "
                        "(a second signal exits at once)",
                        name,
                    )
                    if self.timeout_s:
                        self._timer = threading.Timer(self.timeout_s, self._give_up, args=(signum,))
                        self._timer.daemon = True
                        self._timer.start()
                else:
                    self._exit(signum, f"a second {name}")

    def _give_up(self, signum):
        self._exit(
            signum,
            f"the stop asked by {signal.Signals(signum).name} was not done after {self.timeout_s:g} s "
            "(train.stop_timeout_s)",
        )

    def _exit(self, signum, why: str):
        print(
            f"error: {why}: exiting now without saving; the last complete checkpoint is "
            f"{last_complete_step(self.checkpoint_dir)}",
            file=sys.stderr,
            flush=True,
        )
        os._exit(128 + signum)

    def agreed(self) -> str | None:
        """The stop every process of the run takes at this step: the signal any of them had received
        one step earlier, or None. Called by all processes at every step, so that a SIGTERM to one
        host makes every host save the same step. The exchange is a tiny collective dispatched after
        the step and read one step later, so the host never waits for the device to catch up."""
        import jax

        if jax.process_count() == 1:
            return self.requested
        if self._exchange is None:
            self._exchange = _Exchange()
        mine = signal.Signals[self.requested].value if self.requested else 0
        got = self._exchange(mine)
        return signal.Signals(got).name if got else None

    def __exit__(self, *exc):
        if self._pipe is not None:
            signal.set_wakeup_fd(self._old_fd)
            os.write(self._pipe[1], bytes([_STOP_WATCHING]))
            os.close(self._pipe[1])
            self._watcher.join()  # it has read every signal byte before the stop byte: no timer comes later
        if self._timer is not None:
            self._timer.cancel()
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


class _Exchange:
    """The largest of the processes' numbers, one call late: each call dispatches this call's
    exchange (a max over one value per device) and returns the previous one's result (0 the first
    time). All processes call it at the same steps, as every collective must be."""

    def __init__(self):
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        mesh = Mesh(np.asarray(jax.devices()), ("processes",))
        self.sharding = NamedSharding(mesh, PartitionSpec("processes"))
        self.max = jax.jit(lambda x: x.max(), out_shardings=NamedSharding(mesh, PartitionSpec()))
        self.pending = None

    def __call__(self, mine: int) -> int:
        import jax

        local = np.full((jax.local_device_count(),), mine, np.int32)
        values = jax.make_array_from_process_local_data(self.sharding, local, (jax.device_count(),))
        previous, self.pending = self.pending, self.max(values)
        return 0 if previous is None else int(previous)
