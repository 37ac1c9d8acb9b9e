"""Point-to-point messages between pipeline stages: MPI through mpi4py, since Horovod's TensorFlow ops have no
send/recv. The channel has a communicator of its own (Horovod's collectives never see these messages). Sends are
non-blocking, so a stage goes on computing while its activations travel and no two ranks can wait on each other's
receive; a receive blocks until its tensor is there (the schedule has nothing else to do then). Not a collective:
each message has one sender and one receiver."""
from __future__ import annotations

import time

import numpy as np

from hvdtrain.backend import traffic
from hvdtrain.backend._mpi import mpi


class Channel:
    def __init__(self):
        self.MPI = mpi()
        self.comm = self.MPI.COMM_WORLD.Dup()
        self._pending = []        # (request, buffer): a buffer must live until its send completes
        self.waited = 0.0         # seconds spent waiting to receive (the schedule's idle time)

    def send(self, array, dest: int, tag: int, kind: str = "activations") -> None:
        """Send `array` without waiting; its bytes count as `kind` (traffic.py)."""
        buffer = np.ascontiguousarray(array)
        self._pending.append((self.comm.Isend(buffer, dest=dest, tag=tag), buffer))
        traffic.count_arrays(kind, [buffer])

    def recv(self, source: int, tag: int, tail_shape: tuple, dtype, idle: bool = True) -> np.ndarray:
        """The array `source` sent with `tag`; its first dimension (the batch) is read from the message's size.
        `idle`: the wait counts as idle time of the schedule (`waited`)."""
        started = time.perf_counter()
        status = self._arrived(source, tag)
        dtype = np.dtype(dtype)
        buffer = np.empty(status.Get_count(self.MPI.BYTE) // dtype.itemsize, dtype)
        self.comm.Recv(buffer, source=source, tag=tag)
        if idle:
            self.waited += time.perf_counter() - started
        return buffer.reshape((-1, *tail_shape))

    def _arrived(self, source: int, tag: int):
        """Wait for a message without spinning: MPI's blocking probe busy-polls, taking a core from the peer whose
        result we wait for when ranks share cores. Polls back-to-back for ~50 us, then sleeps between polls (at
        most 200 us), so a message waits at most a sleep longer than it would have."""
        status, pause, spin_until = self.MPI.Status(), 20e-6, time.perf_counter() + 50e-6
        while not self.comm.Iprobe(source=source, tag=tag, status=status):
            if time.perf_counter() > spin_until:
                time.sleep(pause)
                pause = min(2 * pause, 200e-6)
        return status

    def send_object(self, obj, dest: int, tag: int) -> None:
        self._pending.append((self.comm.isend(obj, dest=dest, tag=tag), None))

    def recv_object(self, source: int, tag: int):
        self._arrived(source, tag)
        return self.comm.recv(source=source, tag=tag)

    def flush(self, keep: int = 0) -> None:
        """Wait until every message sent so far but the last `keep` has left (at the end of a step, so its buffers
        can go; while streaming, so they do not pile up)."""
        done = self._pending[:len(self._pending) - keep] if keep else self._pending
        if done:
            self.MPI.Request.Waitall([request for request, _ in done])
            self._pending = self._pending[len(done):]
