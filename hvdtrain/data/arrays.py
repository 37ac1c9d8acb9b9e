"""In-memory sources: scikit-learn's digits, synthetic Gaussians, and .npz files.

Training order: epoch e is a permutation seeded by (data.seed, e); its first `steps * global_batch` examples form
`steps` global batches and rank r takes slice r of each one, so the ranks' batches are disjoint, together make up
the global batch, and hold the same examples whatever the number of ranks (which is what elastic training needs).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from hvdtrain.data import digits
from hvdtrain.data.base import Share, Source, epoch_order, share_of, span_index
from hvdtrain.data.sharding import per_rank_batch, steps_per_epoch
from hvdtrain.errors import DataError
from hvdtrain.tasks import Task

DIGITS_SPLIT_SEED = 0  # fixed: the digits test set never changes between runs or configs


@dataclass(frozen=True)
class Arrays:
    x: np.ndarray
    y: np.ndarray


class ArraySource(Source):
    elastic = True   # in memory: the examples are dealt again to the new world

    def __init__(self, cfg):
        super().__init__(cfg)
        self.task = Task.from_config(cfg)
        self._cache: dict[str, Arrays | None] = {}

    def arrays(self, split: str) -> Arrays | None:
        """The split's arrays, loaded and checked once; None when the source has no such split."""
        if split not in self._cache:
            self._cache[split] = self._load(split)
        return self._cache[split]

    def _load(self, split: str) -> Arrays | None:
        cfg = self.cfg
        if cfg.source == "digits":
            return self._checked(_digits(cfg, split), "digits")
        if cfg.source == "synthetic":
            return _synthetic(cfg, split, self.task)
        path = cfg.path if split == "train" else cfg.test_path
        return self._checked(read_npz(path, self.task), path) if path else None

    def _checked(self, arrays: Arrays, where: str) -> Arrays:
        if len(arrays.y) == 0:
            raise DataError(f"{where}: the dataset is empty")
        if self.cfg.input_shape and tuple(arrays.x.shape[1:]) != tuple(self.cfg.input_shape):
            raise DataError(f"{where}: examples have shape {list(arrays.x.shape[1:])} but data.input_shape is "
                            f"{list(self.cfg.input_shape)}; fix data.input_shape or the data")
        self.task.check_labels(arrays.y, where)
        check_finite(arrays.x, where)
        return Arrays(arrays.x, self.task.labels(arrays.y))

    def example_shape(self) -> tuple:
        return tuple(self.cfg.input_shape) or tuple(self.arrays("train").x.shape[1:])

    def has_split(self, split: str) -> bool:
        return self.cfg.source != "npz" or bool(self.cfg.path if split == "train" else self.cfg.test_path)

    def validate(self, world, split: str) -> dict:
        arrays = self.arrays(split)
        if split == "test" and arrays is not None and tuple(arrays.x.shape[1:]) != self.example_shape():
            raise DataError(f"{self.cfg.test_path}: test examples have shape {list(arrays.x.shape[1:])} but training "
                            f"examples have {list(self.example_shape())}; they must match")
        return {}

    def local_steps(self, world, global_batch: int) -> int:
        return steps_per_epoch(len(self.arrays("train").y), global_batch)

    def train_batches(self, world, global_batch, steps, first_epoch, epochs, skip_steps=0):
        import tensorflow as tf
        arrays = self.arrays("train")
        per_rank = per_rank_batch(global_batch, world.size)
        x, y = tf.constant(arrays.x), tf.constant(arrays.y)
        n, rank, size, seed = len(arrays.y), world.rank, world.size, self.cfg.seed

        def one_epoch(e):
            order = epoch_order(n, seed, e)[: steps * global_batch]
            idx = tf.reshape(order, [steps, size, per_rank])[:, rank, :]
            return tf.data.Dataset.from_tensor_slices(idx)
        stream = tf.data.Dataset.range(first_epoch, epochs).flat_map(one_epoch).skip(skip_steps)
        stream = stream.map(lambda i: (tf.gather(x, i), tf.gather(y, i)), num_parallel_calls=tf.data.AUTOTUNE)
        return stream.prefetch(tf.data.AUTOTUNE)

    def eval_share(self, world, split, batch) -> Share:
        arrays = self.arrays(split)
        if arrays is None:
            raise DataError(f"data.source=npz has no {split} split (set data.test_path)")
        return array_share((arrays.x, arrays.y), world, batch)


def array_share(arrays, world, batch: int) -> Share:
    """This rank's dealt batches of an array (prediction from a .npz with only `x`) or a tuple of arrays."""
    import tensorflow as tf

    def make(spans):
        index = np.asarray(span_index(spans), np.int64)
        return tf.data.Dataset.from_tensor_slices(tf.nest.map_structure(lambda a: a[index], arrays))
    return share_of(len(tf.nest.flatten(arrays)[0]), batch, world, make)


def _digits(cfg, split: str) -> Arrays:
    images, labels = digits.load()
    train, test = digits.split(labels, cfg.test_fraction, DIGITS_SPLIT_SEED)
    index = train if split == "train" else test
    return Arrays((images[index] / 16.0).astype(np.float32)[..., None], labels[index])


def _synthetic(cfg, split: str, task: Task) -> Arrays:
    """Gaussian inputs labelled by a fixed random linear teacher: learnable, any shape, any task, reproducible."""
    n = cfg.synthetic_samples if split == "train" else max(1, cfg.synthetic_samples // 4)
    rng = np.random.default_rng([cfg.seed, 0 if split == "train" else 1])
    x = rng.standard_normal((n, *cfg.input_shape), dtype=np.float32)
    teacher = np.random.default_rng(cfg.seed).standard_normal((int(np.prod(cfg.input_shape)), cfg.num_classes))
    scores = x.reshape(n, -1) @ teacher.astype(np.float32)
    if task.kind == "classification":
        y = np.argmax(scores, axis=1).astype(np.int64)
    elif task.kind == "multilabel":
        y = (scores > 0).astype(np.float32)
    else:
        y = (scores / np.sqrt(scores.shape[1] or 1)).astype(np.float32)
    return Arrays(x, y)


def read_npz(path: str, task: Task | None = None, labels: bool = True) -> Arrays:
    """Arrays x (and y) of a .npz file. Without labels (prediction inputs) y is empty and x may be empty."""
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path} (set data.path / data.test_path / --input to an existing .npz file)")
    try:
        with np.load(path) as f:
            wanted = ("x", "y") if labels else ("x",)
            if any(k not in f for k in wanted):
                raise DataError(f"{path} must contain arrays named {' and '.join(repr(k) for k in wanted)} "
                                f"(found: {', '.join(f.files) or 'none'})")
            x = f["x"].astype(np.float32)
            y = f["y"] if labels else np.zeros(0)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path} as a .npz file: {exc}") from None
    if labels and len(x) != len(y):
        raise DataError(f"{path}: x has {len(x)} rows but y has {len(y)}; they must match")
    if labels and task is not None and task.kind == "classification":
        y = y.reshape(len(y), -1)[:, 0] if y.ndim > 1 and y.shape[1] == 1 else y
    return Arrays(x, y)


def check_finite(x: np.ndarray, where: str) -> None:
    finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1) if len(x) else np.ones(0, bool)
    if not finite.all():
        bad = int((~finite).sum())
        raise DataError(f"{where}: example {int(np.argmin(finite))} has a non-finite feature (NaN or Inf); "
                        f"{bad} such example{'s' if bad != 1 else ''} in all; clean the data")
