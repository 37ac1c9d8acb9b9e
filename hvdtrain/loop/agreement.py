"""The agreed stop: at agreement steps every rank reaches the same verdict (non-finite loss or weights, a stop
request, a peer that left after a data error), so no rank is left waiting in a collective and only weights every
rank found finite are checkpointed. A rank whose input pipeline fails mid-step leaves with Horovod's join; the
others notice at their next agreement and report its error."""
from __future__ import annotations

import math

import numpy as np

from hvdtrain import backend
from hvdtrain.errors import DataError, first_line


class StopAgreement:
    """One all-reduce of a vector: per rank 'loss or weights not finite', 'a stop was requested', and 'I am here'. A
    rank that hit a data error has left with Horovod's join (its share of the vector reads zero), so the others see
    it, stop at the same step and report that rank's error, agreed. The verdict goes into `progress.stop_reason`."""

    def __init__(self, world, progress, stop):
        self.world, self.progress, self.stop = world, progress, stop
        self._finite = None

    def _weights_finite(self, model) -> bool:
        if self._finite is None:   # traced once over the model's variables (one model per loop)
            import tensorflow as tf
            variables = model.trainable_variables
            self._finite = tf.function(lambda: tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in variables]),
                                       autograph=False)   # plain ops: nothing for AutoGraph to convert
        return bool(self._finite())

    def check(self, model, logs: dict) -> None:
        size = self.world.size
        # Weights too: a NaN gradient can leave the loss finite (e.g. ReLU maps NaN to 0) while the model is dead.
        healthy = math.isfinite(float(logs.get("loss", 0.0))) and self._weights_finite(model)
        flags = np.zeros(size + 2)
        flags[self.world.rank] = 0.0 if healthy else 1.0
        flags[size] = 1.0 if self.stop.requested else 0.0
        flags[size + 1] = 1.0
        total = backend.allreduce_sum(flags, name="hvdtrain.agreed_stop")
        p = self.progress.position
        if total[size + 1] < size:   # a peer left after a data error: join it, then report its error
            self.progress.stop_reason = "data_error"
            backend.follow_leaver("hvdtrain.data_error")
        bad = [r for r in range(size) if total[r] > 0]
        if bad:
            self.progress.failure = (
                f"non-finite loss or weights at epoch {p.epoch + 1}, step {p.step_in_epoch} (global step "
                f"{p.global_step}) on rank(s) {', '.join(map(str, bad))}; all ranks stopped, the last good checkpoint "
                "is kept; lower optim.lr or check the data")
            self.progress.stop_reason = "nonfinite"
        elif total[size] > 0:
            self.progress.stop_reason = "stop_requested"
            self.progress.requested_by = self._who_asked()

    def _who_asked(self) -> str:
        names = backend.allgather_object(self.stop.signal_name if self.stop.requested else "", "hvdtrain.stop_reason")
        asked = {rank: name for rank, name in enumerate(names) if name}
        if len(asked) == len(names) and len(set(asked.values())) == 1:
            return names[0]
        return ", ".join(f"{name} on rank {rank}" for rank, name in asked.items())


def data_error_during_fit(exc: BaseException, progress, world, diagnose=None) -> None:
    """On the rank whose input pipeline failed mid-step: leave with Horovod's join (the peers notice at their next
    agreement step and join too), then raise this rank's error, agreed by all. Returns for anything else.
    `diagnose()` re-checks this rank's inputs and names the bad file and record, if it can."""
    if not is_input_error(exc):
        return
    import tensorflow as tf
    p = progress.position
    kind = "corrupt" if isinstance(exc, tf.errors.DataLossError) else "unreadable or malformed"
    found = diagnose() if diagnose else None
    message = (f"{found or f'{kind} input data ({first_line(exc)})'}; found at epoch {p.epoch + 1}, step "
               f"{p.step_in_epoch} on rank {world.rank}: the inputs were valid at the start, so a file changed or "
               "vanished since; fix it and rerun the same command to resume")
    backend.leave_with(DataError(message), "hvdtrain.data_error")


def is_input_error(exc: BaseException) -> bool:
    """An error raised by the input pipeline (tf.data's IteratorGetNext), not by the model or a collective."""
    import tensorflow as tf
    return isinstance(exc, tf.errors.OpError) and "IteratorGetNext" in str(exc) and not backend.from_horovod(exc)
