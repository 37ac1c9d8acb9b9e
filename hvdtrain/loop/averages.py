"""What the loop averages over ranks besides the gradients: each epoch's logged metrics, and the state each rank
updates from its own batches alone (batch-norm moving statistics)."""
from __future__ import annotations

import numpy as np

from hvdtrain import backend
from hvdtrain.errors import UserError
from hvdtrain.variables import float_variables


class MetricAverage:
    """Epoch metrics averaged over ranks, keys in sorted order on every rank (one all-reduce)."""

    def __init__(self, world):
        self.world = world
        self._keys = None

    def average(self, logs) -> None:
        if logs is None or self.world.size == 1:
            return
        keys = sorted(k for k, v in logs.items() if is_number(v))
        if self._keys is None:   # once: every rank must average the same metrics, or the all-reduce would hang
            every = backend.allgather_object(keys, "hvdtrain.metric_keys")
            if any(k != every[0] for k in every):
                raise UserError(f"ranks log different metrics {every}; compile the same metrics on every rank",
                                agreed=True)
            self._keys = keys
        values = backend.allreduce_sum([float(logs[k]) for k in self._keys], "hvdtrain.metric_average") / self.world.size
        logs.update(zip(self._keys, (float(v) for v in values)))


def is_number(value) -> bool:
    try:
        float(value)
        return np.ndim(value) == 0
    except (TypeError, ValueError):
        return False


class LocalState:
    """What each rank updates from its own batches alone: batch-norm moving statistics (the model's non-trainable
    float variables; training never reads them). Averaged over the replicas whenever the model is read, before
    checkpoints, evaluation and the final replica check, as MirroredStrategy averages them on read; so every rank
    saves and evaluates the same model. Models without such variables (the MLP) never communicate here."""

    def __init__(self, world):
        self.world, self._average, self._step = world, None, None

    def synced_at(self, step: int) -> None:
        """The state was averaged at `step` already (with a strategy's weight average)."""
        self._step = step

    def sync(self, model, step: int) -> None:
        """A collective for models with local state: every rank calls it at the same step."""
        if self.world.replicas == 1 or step == self._step:
            return
        if self._average is None:
            local = float_variables(model.non_trainable_variables)
            self._average = backend.variable_averager(local, "hvdtrain.local_state", self.world.replica_group) \
                if local else (lambda: None)
        self._average()
        self._step = step
