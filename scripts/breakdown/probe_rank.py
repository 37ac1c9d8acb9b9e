"""One rank of scripts/breakdown/breakdown.py: back-to-back all-reduces inside a tf.function, as `hvdtrain bench
allreduce` issues them (one tensor) or as a training step does (the MLP's gradients in one grouped average).

    horovodrun -np 2 --mpi python scripts/breakdown/probe_rank.py single|group BYTES ITERS [--runtime.x=y ...]

Horovod must be the probe build (scripts/breakdown/horovod-0.28.1-probe.patch) and HVD_PROBE_DIR set: the timestamps
are written when the process ends. Every result is checked against its exact value. Rank 0 prints the time per call.
"""
import os
import sys
import time

import numpy as np

from hvdtrain import backend, world
from hvdtrain.backend._horovod import hvd
from hvdtrain.config import load_config
from hvdtrain.runtime import import_tensorflow

MLP_GRADIENTS = [(1024, 2048), (2048,), (2048, 2048), (2048,), (2048, 10), (10,)]   # 24 MB, bench train's mlp


def main(case: str, size: int, iters: int, overrides: list[str]) -> None:
    tf = import_tensorflow()
    w = world.start(load_config(None, overrides).runtime)   # hvdtrain's settings, threads included
    h = hvd()
    if case == "group":
        inputs = [tf.constant(np.full(shape, w.rank + 1, np.float32)) for shape in MLP_GRADIENTS]
        expected = [np.full(shape, (1 + w.size) / 2, np.float32) for shape in MLP_GRADIENTS]
        reduce = lambda xs: h.grouped_allreduce(xs, op=h.Average, name="probe.group")  # noqa: E731
    else:
        pattern = (np.arange(size // 4) % 7 + 1).astype(np.float32)
        inputs = [tf.constant(pattern * (w.rank + 1))]
        expected = [pattern * (w.size * (w.size + 1) / 2)]
        reduce = lambda xs: [h.allreduce(xs[0], op=h.Sum, name="probe.single")]  # noqa: E731

    @tf.function
    def loop(n):
        def body(i, previous):
            with tf.control_dependencies(previous):   # each waits for the one before
                return i + 1, reduce(inputs)
        return tf.while_loop(lambda i, _: i < n, body, (tf.constant(0), [tf.zeros_like(x) for x in inputs]),
                             parallel_iterations=1)[1]

    got = loop(tf.constant(3))
    assert all(np.array_equal(g.numpy(), e) for g, e in zip(got, expected)), "wrong all-reduce result"
    backend.barrier()
    start = time.perf_counter()
    loop(tf.constant(iters))[0].numpy()
    if w.rank == 0:
        print(f"per call {(time.perf_counter() - start) / iters * 1e6:.1f} us, load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
