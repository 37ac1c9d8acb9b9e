"""Runs inside each rank: Horovod as scripts/patches builds it, woken by each request instead of its cycle.

usage: wake_worker.py OUT_DIR

Every cycle is 60 s (HOROVOD_CYCLE_TIME, and HOROVOD_IDLE_CYCLE_TIME which replaces it when woken by requests), so
an all-reduce that waited for the background thread's next cycle would take up to a minute.
Writes what this rank computed and how long the back-to-back all-reduces took, for the test to compare.
"""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

CYCLE_S = 60
os.environ.update(HOROVOD_CYCLE_TIME=str(CYCLE_S * 1000), HOROVOD_IDLE_CYCLE_TIME=str(CYCLE_S * 1000),
                  HOROVOD_WAKE_ON_ENQUEUE="1")   # before Horovod starts

from hvdtrain.backend._horovod import hvd  # noqa: E402
from hvdtrain.runtime import import_tensorflow  # noqa: E402

tf = import_tensorflow()
h = hvd()
h.init()
rank = h.rank()
BACK_TO_BACK = 20


@tf.function
def chain(x):
    """All-reduces one after the other, each waiting for the previous one's result."""
    for _ in range(BACK_TO_BACK):
        x = h.allreduce(x, op=h.Sum, name="wake.chain") / 2.0
    return x


x = tf.constant(np.arange(1024, dtype=np.float32) * (rank + 1))
chain(x)   # traced and the name negotiated once
start = time.perf_counter()
chained = chain(x).numpy()
back_to_back_s = time.perf_counter() - start

# The second rank asks 0.3 s after the first, three times: the first rank's request waits for it, then both go on.
late = []
for i in range(3):
    if rank == 1:
        time.sleep(0.3)
    late.append(h.allreduce(tf.constant([float(rank + i)]), op=h.Sum, name="wake.late").numpy().tolist())

# Averages: a fused group (scaled while copied out of the fusion buffer) and a single tensor (scaled in place).
rng = np.random.default_rng(rank)
group = [rng.standard_normal(shape).astype(np.float32) for shape in ((7, 13), (1000,), (3,))]
averaged = [t.numpy() for t in h.grouped_allreduce([tf.constant(g) for g in group], op=h.Average, name="wake.group")]
single = h.allreduce(tf.constant(group[1]), op=h.Average, name="wake.single").numpy()

out = Path(sys.argv[1])
np.savez(out / f"arrays-rank{rank}.npz", *group, *averaged, chained=chained, single=single)
(out / f"rank{rank}.json").write_text(json.dumps({"back_to_back_s": back_to_back_s, "cycle_s": CYCLE_S,
                                                  "late": late, "groups": len(group)}))
