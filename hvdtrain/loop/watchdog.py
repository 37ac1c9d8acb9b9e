"""Ends this rank when training makes no progress for `timeout` seconds.

A rank blocked in a collective whose peer died, stalled or lost its network would otherwise wait forever (MPI has no
timeout). Armed after the first step (tracing and the initial broadcast may be slow); epoch-end work (evaluation,
checkpoint) must finish within the timeout too. Exiting lets the launcher stop the others. The loop controller
beats it at every step and epoch boundary; `waiting()` disarms it around a wait that is not a stall (a federated
round's average, where peers with larger clients are still training).
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

from hvdtrain.errors import CollectiveFailure


class Watchdog:
    EXIT_CODE = CollectiveFailure.exit_code

    def __init__(self, timeout: float, rank: int, run_dir, stream=None):
        self.timeout, self.rank, self.run_dir = timeout, rank, run_dir
        self.stream = stream or sys.stderr
        self.last_beat, self.armed, self.done = time.monotonic(), False, threading.Event()

    def start(self) -> None:
        self.done.clear()
        self.beat()
        threading.Thread(target=self._watch, name="hvdtrain-watchdog", daemon=True).start()

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def arm(self) -> None:
        """After a step: from now on, no progress for `timeout` seconds ends the rank."""
        self.beat()
        self.armed = True

    def stop(self) -> None:
        self.done.set()

    @contextlib.contextmanager
    def waiting(self):
        armed, self.armed = self.armed, False
        try:
            yield
        finally:
            self.beat()
            self.armed = armed

    def _watch(self):
        while not self.done.wait(min(1.0, self.timeout / 10)):
            idle = time.monotonic() - self.last_beat
            if self.armed and idle > self.timeout:
                self.stream.write(   # one write, newline included: launchers tag output per write
                    f"hvdtrain: error: rank {self.rank} made no progress for {idle:.0f} s (runtime.stall_timeout_s="
                    f"{self.timeout:g}): a peer rank died, stalled or lost its network; stopping. The checkpoints in "
                    f"{self.run_dir}/checkpoints are intact: rerun the same command to resume.\n")
                self.stream.flush()
                os._exit(self.EXIT_CODE)
