"""Exact distributed evaluation: each rank sums (loss, correct, ..., count) over its contiguous share; the sums are
all-reduced and divided once. Averaging per-rank means would be wrong whenever shares differ in size; this equals a
single-process evaluation of the same data, whatever the number of ranks. Errors while reading a share (a corrupt
file) are agreed: every rank stops with that rank's message instead of waiting for it in the all-reduce."""
from __future__ import annotations

import numpy as np

from hvdtrain import dist
from hvdtrain.errors import DataError, first_line


def _sum_step(model, task):
    """One traced function per (model, task), cached on the model, so per-epoch evaluation does not retrace."""
    cache = model.__dict__.setdefault("_hvdtrain_eval_steps", {})
    if task not in cache:
        import tensorflow as tf

        @tf.function(reduce_retracing=True)
        def step(x, y):
            return tf.stack(task.batch_sums(model(x, training=False), y))
        cache[task] = step
    return cache[task]


def local_sums(model, dataset, task, where: str = "held-out data", diagnose=None, expected: int | None = None) -> np.ndarray:
    """The task's sums over this rank's share; a read error becomes a DataError naming the file when `diagnose()`
    (a re-check of this rank's inputs) can find it, else what was being read."""
    import tensorflow as tf
    step = _sum_step(model, task)
    sums = np.zeros(len(task.sum_names()))
    try:
        for x, y in dataset:
            sums += step(x, y).numpy()
    except tf.errors.OpError as exc:
        kind = "corrupt" if isinstance(exc, tf.errors.DataLossError) else "unreadable or malformed"
        found = diagnose() if diagnose else None
        raise DataError(f"{found or f'{kind} {where} ({first_line(exc)})'}; found while evaluating") from None
    examples = int(sums[task.sum_names().index("examples")])
    if expected is not None and examples != expected:   # a file shrank or grew since validation: never a silent result
        found = diagnose() if diagnose else None
        raise DataError(f"{found or f'{where} changed since the start ({examples} examples now, {expected} then)'}; "
                        "found while evaluating: rerun to check the inputs again")
    return sums


def exact_metrics(model, dataset, world, task, name: str = "hvdtrain.evaluate", where: str = "held-out data",
                  diagnose=None, expected: int | None = None) -> dict:
    """The task's metrics over every rank's share of `dataset` together, identical on every rank (a collective).
    `expected`: this rank's example count, checked after reading."""
    def read():
        return local_sums(model, dataset, task, where, diagnose, expected)
    local = dist.agree_on_errors(read, f"{name}.read") if world.size > 1 else read()
    total = dist.allreduce_sum(local, name=name) if world.size > 1 else local
    return task.metrics_from_sums(total)


class Evaluator:
    """model -> exact metrics of one split of a data source (None when the source has no such split). The share is
    built once and re-read at every call, so a split is never re-listed or re-scanned between epochs."""

    def __init__(self, source, world, task, split: str = "test", batch: int = 256):
        self.source, self.world, self.task, self.split = source, world, task, split
        self.share = source.eval_share(world, split, batch) if source.has_split(split) else None
        self.where = f"{split} data"

    def __call__(self, model) -> dict | None:
        if self.share is None:
            return None
        return exact_metrics(model, self.share.dataset, self.world, self.task, f"hvdtrain.evaluate.{self.split}",
                             self.where, diagnose=lambda: self.source.diagnose(self.world, self.split),
                             expected=self.share.count)
