"""The stages' balance as it runs: each rank's share of its training steps spent waiting for activations or
gradients (its idle share in the schedule), gathered at every epoch end and logged by rank 0 beside GPipe's
(P - 1) / (M + P - 1), the share equal stages would wait. A stage that waits much less than the others is the
slowest one: move layers out of it (parallel.split)."""
from __future__ import annotations

import time

import keras

from hvdtrain import backend
from hvdtrain.pipeline.schedule import bubble


class MeasuredBalance(keras.callbacks.Callback):
    def __init__(self, channel, world, microbatches: int, log):
        super().__init__()
        self.channel, self.world, self.microbatches, self.log = channel, world, microbatches, log
        self.stepping = self.waiting = 0.0   # seconds in steps, and of them waiting, over the run
        self.epoch = (0.0, 0.0)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = (self.stepping, self.waiting)

    def on_train_batch_begin(self, batch, logs=None):
        self.started, self.waited_before = time.perf_counter(), self.channel.waited

    def on_train_batch_end(self, batch, logs=None):
        self.stepping += time.perf_counter() - self.started
        self.waiting += self.channel.waited - self.waited_before

    def on_epoch_end(self, epoch, logs=None):
        share = _share(self.stepping - self.epoch[0], self.waiting - self.epoch[1])
        shares = backend.allgather_object(share, "hvdtrain.pipeline.balance")
        w = self.world
        stages = ", ".join(f"stage {s + 1} {shares[w.rank_of(0, s)]:.0%}" for s in range(w.stages))   # pipeline 1
        self.log.info(f"pipeline balance, epoch {epoch + 1}: share of the steps each stage waited: {stages} (equal "
                      f"stages: {bubble(w.stages, self.microbatches):.0%})")

    def idle_share(self) -> float:
        """This rank's idle share over the run."""
        return _share(self.stepping, self.waiting)


def _share(stepping: float, waiting: float) -> float:
    return waiting / stepping if stepping else 0.0
