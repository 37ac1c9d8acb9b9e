"""Data-parallel evaluation: each rank scores its contiguous share; metrics come from all-reduced sums.

Averaging per-rank accuracies is wrong when shards differ in size; summing (correct, loss, count) over
ranks and dividing once is exact and equals a single-process evaluation of the same data.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from hvdtrain import data, dist


def _local_sums(model, dataset) -> np.ndarray:
    """[loss sum, correct count, example count] over this rank's share."""
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")

    @tf.function
    def step(x, y):
        logits = model(x, training=False)
        loss = tf.reduce_sum(tf.cast(loss_fn(y, logits), tf.float64))
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=-1), y), tf.float64))
        return loss, correct

    sums = np.zeros(3)
    for x, y in dataset:
        loss, correct = step(x, y)
        sums += (loss.numpy(), correct.numpy(), int(y.shape[0]))
    return sums


def exact_metrics(model, dataset, topo, name: str = "hvdtrain.evaluate") -> dict:
    """Loss and accuracy over every rank's share of `dataset` together, identical on every rank."""
    local = _local_sums(model, dataset)
    loss, correct, count = dist.allreduce_sum(local, name=name) if topo.size > 1 else local
    return {"loss": loss / max(count, 1), "accuracy": correct / max(count, 1), "examples": int(count)}


def evaluate(model, data_cfg, topo, split: str = "test", batch: int = 256) -> dict | None:
    """Exact metrics over a configured split (see data.eval_data); None if the data source has no such split."""
    share = data.eval_data(data_cfg, topo, split, batch)
    return None if share is None else exact_metrics(model, share[0], topo, f"hvdtrain.evaluate.{split}")
