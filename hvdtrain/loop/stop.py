"""Stop requests: a signal (SIGUSR1/SIGTERM, Slurm's notice before preemption or the time limit) or a file appearing
in the run directory (`hvdtrain sweep` prunes trials this way). Read by the agreement (loop/agreement.py) at its
steps; a file request is served once its checkpoint is written, so a rerun resumes instead of stopping again."""
from __future__ import annotations

import os
import signal


class StopRequest:
    def __init__(self, stop_file=None):
        self.signal_name = ""
        self.stop_file = stop_file
        self._requested = False
        self._seen = None   # (device, inode) of the stop file this request saw

    def install(self, signals=(signal.SIGUSR1, signal.SIGTERM)) -> "StopRequest":
        for sig in signals:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self._requested, self.signal_name = True, signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        if not self._requested and self.stop_file:
            self._seen = _identity(self.stop_file)
            if self._seen:
                self._requested, self.signal_name = True, f"stop file {self.stop_file}"
        return self._requested

    def request(self, reason: str = "request") -> None:
        self._requested, self.signal_name = True, reason

    def consume(self) -> bool:
        """Remove the stop file this request saw (after the stop's checkpoint, on rank 0): taken away atomically by a
        rename, and put back if it is a newer file than the one seen (a new request must not be lost)."""
        if not self._seen:
            return False
        taken = f"{self.stop_file}.served"
        try:
            os.rename(self.stop_file, taken)
        except FileNotFoundError:
            return False
        if _identity(taken) != self._seen:
            os.rename(taken, self.stop_file)
            return False
        os.unlink(taken)
        self._seen = None
        return True


def _identity(path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino
