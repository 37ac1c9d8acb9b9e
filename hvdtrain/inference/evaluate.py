"""Exact distributed evaluation: each rank computes the task's sums (loss, correct, ..., count) of each of its
batches (the single-process run's batches, dealt whole: see sharding.dealt_batches); every batch's sums are gathered
and added in batch order, starting from zero, exactly as one process adds them, and divided once. So the result is
bit for bit that of one process, whatever the number of ranks and the machine (float addition is not associative:
an all-reduce of per-rank totals would not be). Errors while reading a share (a corrupt file) are agreed: every rank
stops with that rank's message instead of waiting for it in the gather."""
from __future__ import annotations

import contextlib
import weakref

import numpy as np

from hvdtrain import backend
from hvdtrain.data.sharding import in_batch_order
from hvdtrain.errors import DataError, first_line


_SUM_STEPS = weakref.WeakKeyDictionary()   # model -> {task: its traced step}, gone with the model


def _sum_step(model, task):
    """One traced function per (model, task), kept while the model lives, so per-epoch evaluation does not
    retrace."""
    cache = _SUM_STEPS.setdefault(model, {})
    if task not in cache:
        import tensorflow as tf

        # The task's sums are plain ops: AutoGraph's conversion of them cost ~0.35 s of every rank's start (measured).
        sums = tf.autograph.experimental.do_not_convert(task.batch_sums)
        scored = weakref.ref(model)   # not the model itself: the cache must not keep its key alive

        @tf.function(reduce_retracing=True)
        def step(x, y):
            return tf.stack(sums(scored()(x, training=False), y))
        cache[task] = step
    return cache[task]


def batch_sums(model, dataset, task, where: str = "held-out data", diagnose=None,
               expected: int | None = None) -> list[np.ndarray]:
    """The task's sums of each batch of this rank's share; a read error becomes a DataError naming the file when
    `diagnose()` (a re-check of this rank's inputs) can find it, else what was being read."""
    step = _sum_step(model, task)
    sums = [step(x, y).numpy() for x, y in reading(dataset, lambda: read_errors(where, diagnose))]
    check_count(sums, task, where, diagnose, expected)
    return sums


@contextlib.contextmanager
def read_errors(where: str, diagnose=None, doing: str = "evaluating"):
    """A read error of the inputs (TensorFlow's) as a DataError naming the file when `diagnose()` (a re-check of
    this rank's inputs) can find it, else what was being read. Around reading only: a model's own error is not
    the data's."""
    import tensorflow as tf
    try:
        yield
    except tf.errors.OpError as exc:
        kind = "corrupt" if isinstance(exc, tf.errors.DataLossError) else "unreadable or malformed"
        found = diagnose() if diagnose else None
        raise DataError(f"{found or f'{kind} {where} ({first_line(exc)})'}; found while {doing}") from None


def reading(items, context):
    """The items of `items`, each read inside `context()` (e.g. read_errors), nothing else inside it."""
    items = iter(items)
    while True:
        with context():
            item = next(items, None)
        if item is None:
            return
        yield item


def check_count(sums: list, task, where: str, diagnose=None, expected: int | None = None) -> None:
    """A file that shrank or grew since validation stops the evaluation: never a silent result."""
    examples = int(sum(s[task.sum_names().index("examples")] for s in sums))
    if expected is not None and examples != expected:
        found = diagnose() if diagnose else None
        raise DataError(f"{found or f'{where} changed since the start ({examples} examples now, {expected} then)'}; "
                        "found while evaluating: rerun to check the inputs again")


def exact_metrics(model, dataset, world, task, name: str = "hvdtrain.evaluate", where: str = "held-out data",
                  diagnose=None, expected: int | None = None) -> dict:
    """The task's metrics over every replica's batches of `dataset` together, identical on every rank (a collective).
    Replica r's k-th batch counts as global batch r + k*replicas (dealt batches); the ranks of a tensor group read
    the same batches and compute the same sums, and one of them reports (world.reporters); `expected`: this rank's
    example count, checked after reading."""
    def read():
        return batch_sums(model, dataset, task, where, diagnose, expected)
    parts = backend.gather_agreed(read, f"{name}.read")
    reported = [parts[rank] for rank in world.reporters()]
    return task.metrics_from_sums(ordered_total(in_batch_order(reported), len(task.sum_names())))


def ordered_total(sums: list, width: int) -> np.ndarray:
    """Batch sums added one by one, in the order given, from zero (float64): one process's order on every path."""
    total = np.zeros(width)
    for s in sums:
        total += s
    return total


class Evaluator:
    """model -> exact metrics of one split of a data source (None when the source has no such split). The share is
    built once and re-read at every call, so a split is never re-listed or re-scanned between epochs."""

    def __init__(self, source, world, task, split: str = "test", batch: int = 256):
        self.source, self.world, self.task, self.split = source, world, task, split
        self.share = source.eval_share(world.data_view(), split, batch) if source.has_split(split) else None
        self.where = f"{split} data"

    def __call__(self, model) -> dict | None:
        if self.share is None:
            return None
        return exact_metrics(model, self.share.dataset, self.world, self.task, f"hvdtrain.evaluate.{self.split}",
                             self.where, diagnose=lambda: self.source.diagnose(self.world.data_view(), self.split),
                             expected=self.share.count)
