"""Sharded tf.data pipelines. Knows ranks only through a Topology value and never calls Horovod.

Training order: epoch e is a permutation seeded by (data.seed, e); its first `steps * global_batch` examples
form `steps` global batches and rank r takes slice r of each one (so the ranks' batches are disjoint and
together make up the global batch). TFRecord files are sharded by file when there are at least as many files
as ranks, else by element; every rank then runs the agreed (MIN over ranks) number of steps, because uneven
step counts make Horovod stall. Evaluation shards are contiguous, never padded, never truncated.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
import numpy as np

from hvdtrain.errors import UserError

DIGITS_SPLIT_SEED = 0  # fixed: the digits test set never changes between runs or configs


# ---------------------------------------------------------------- pure sharding arithmetic

def per_rank_batch(global_batch: int, size: int) -> int:
    if global_batch % size:
        raise UserError(f"global batch {global_batch} is not divisible by {size} ranks")
    return global_batch // size


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    steps = num_examples // global_batch
    if steps == 0:
        raise UserError(f"the training set has {num_examples} examples, fewer than one global batch of {global_batch}; "
                        "lower trainer.global_batch_size or add data")
    return steps


def shard_files(files: list[str], rank: int, size: int) -> list[str] | None:
    """Files for one rank (round-robin over the sorted list), or None when there are fewer files than ranks."""
    return files[rank::size] if len(files) >= size else None


def eval_range(num_examples: int, rank: int, size: int) -> tuple[int, int]:
    """Contiguous [start, stop) for one rank; sizes differ by at most one, every example counted once."""
    base, extra = divmod(num_examples, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


# ---------------------------------------------------------------- sources

@dataclass(frozen=True)
class Arrays:
    x: np.ndarray
    y: np.ndarray


def load_arrays(data_cfg, split: str) -> Arrays | None:
    """In-memory sources. Returns None for TFRecord (streamed) and for npz without a test file."""
    source = data_cfg.source
    if source == "digits":
        return _digits(data_cfg, split)
    if source == "synthetic":
        return _synthetic(data_cfg, split)
    if source == "npz":
        path = data_cfg.path if split == "train" else data_cfg.test_path
        return _npz(path, data_cfg) if path else None
    return None


def _digits(data_cfg, split: str) -> Arrays:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[..., None]
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=data_cfg.test_fraction,
                                              random_state=DIGITS_SPLIT_SEED, stratify=y)
    return _checked(Arrays(x_tr, y_tr) if split == "train" else Arrays(x_te, y_te), data_cfg, "digits")


def _synthetic(data_cfg, split: str) -> Arrays:
    """Gaussian inputs labelled by a fixed random linear teacher: learnable, any shape, reproducible."""
    n = data_cfg.synthetic_samples if split == "train" else max(1, data_cfg.synthetic_samples // 4)
    rng = np.random.default_rng([data_cfg.seed, 0 if split == "train" else 1])
    x = rng.standard_normal((n, *data_cfg.input_shape), dtype=np.float32)
    teacher = np.random.default_rng(data_cfg.seed).standard_normal((int(np.prod(data_cfg.input_shape)), data_cfg.num_classes))
    y = np.argmax(x.reshape(n, -1) @ teacher.astype(np.float32), axis=1).astype(np.int64)
    return Arrays(x, y)


def _npz(path: str, data_cfg) -> Arrays:
    if not os.path.isfile(path):
        raise UserError(f"data file not found: {path} (set data.path / data.test_path to an existing .npz file)")
    try:
        with np.load(path) as f:
            if "x" not in f or "y" not in f:
                raise UserError(f"{path} must contain arrays named 'x' and 'y' (found: {', '.join(f.files) or 'none'})")
            arrays = Arrays(f["x"].astype(np.float32), f["y"].astype(np.int64).reshape(-1))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path} as a .npz file: {exc}") from None
    if len(arrays.x) != len(arrays.y):
        raise UserError(f"{path}: x has {len(arrays.x)} rows but y has {len(arrays.y)}; they must match")
    return _checked(arrays, data_cfg, path)


def _checked(arrays: Arrays, data_cfg, where: str) -> Arrays:
    if len(arrays.y) == 0:
        raise UserError(f"{where}: the dataset is empty")
    if data_cfg.input_shape and tuple(arrays.x.shape[1:]) != tuple(data_cfg.input_shape):
        raise UserError(f"{where}: examples have shape {list(arrays.x.shape[1:])} but data.input_shape is "
                        f"{list(data_cfg.input_shape)}; fix data.input_shape or the data")
    _check_labels(arrays.y, data_cfg.num_classes, where)
    finite = np.isfinite(arrays.x.reshape(len(arrays.x), -1)).all(axis=1)
    if not finite.all():
        raise UserError(f"{where}: example {int(np.argmin(finite))} has a non-finite feature (NaN or Inf); "
                        f"{int((~finite).sum())} such examples in all; clean the data")
    return arrays


def _check_labels(y: np.ndarray, num_classes: int, where: str) -> None:
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        bad = int(y.min() if y.min() < 0 else y.max())
        raise UserError(f"{where}: label {bad} is outside [0, {num_classes}); set data.num_classes or fix the labels")


def input_shape(data_cfg) -> tuple:
    if data_cfg.input_shape:
        return tuple(data_cfg.input_shape)
    arrays = load_arrays(data_cfg, "train")
    return tuple(arrays.x.shape[1:])


# ---------------------------------------------------------------- TFRecord

def list_files(pattern: str) -> list[str]:
    """A directory, a glob or a single file, always in sorted order so every rank sees the same list."""
    if os.path.isdir(pattern):
        files = sorted(glob.glob(os.path.join(pattern, "*.tfrecord*")))
    else:
        files = sorted(glob.glob(pattern))
    if not files:
        raise UserError(f"no TFRecord files match {pattern!r}; set data.path to a directory of *.tfrecord files or a glob")
    return files


def write_tfrecords(x: np.ndarray, y: np.ndarray, paths: list[str]) -> None:
    """Write examples round-robin into the given files (features: 'x' flat float list, 'y' int64)."""
    import tensorflow as tf
    writers = [tf.io.TFRecordWriter(p) for p in paths]
    for i, (xi, yi) in enumerate(zip(x, y)):
        feature = {"x": tf.train.Feature(float_list=tf.train.FloatList(value=np.ravel(xi).tolist())),
                   "y": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(yi)]))}
        writers[i % len(paths)].write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    for w in writers:
        w.close()


def _parser(shape: tuple):
    import tensorflow as tf
    spec = {"x": tf.io.FixedLenFeature([int(np.prod(shape))], tf.float32), "y": tf.io.FixedLenFeature([], tf.int64)}

    def parse(record):
        ex = tf.io.parse_single_example(record, spec)
        return tf.reshape(ex["x"], shape), ex["y"]
    return parse


def _records(files: list[str], rank: int, size: int):
    """This rank's raw records, in a fixed order: its own files, or every size-th record when files are scarce."""
    import tensorflow as tf
    own = shard_files(files, rank, size)
    if own is not None:
        return tf.data.TFRecordDataset(own), own
    return tf.data.TFRecordDataset(files).shard(size, rank), files


def scan_tfrecords(files: list[str], rank: int, size: int, data_cfg) -> int:
    """Count and validate this rank's records (shape and labels), turning corruption into a clear error."""
    import tensorflow as tf
    records, seen_files = _records(files, rank, size)
    parse = _parser(tuple(data_cfg.input_shape))
    count = 0
    try:
        for x, y in records.map(parse, num_parallel_calls=tf.data.AUTOTUNE).batch(4096):
            _check_labels(y.numpy(), data_cfg.num_classes, f"TFRecord files {seen_files[0]}...")
            count += int(y.shape[0])
    except tf.errors.DataLossError as exc:
        raise UserError(f"corrupt TFRecord data in {', '.join(seen_files)}: {exc.message.splitlines()[0]}") from None
    except tf.errors.InvalidArgumentError as exc:
        raise UserError(f"TFRecord examples in {seen_files[0]} do not match data.input_shape={list(data_cfg.input_shape)} "
                        f"(features 'x' float list, 'y' int64): {exc.message.splitlines()[0]}") from None
    return count


# ---------------------------------------------------------------- pipelines

@dataclass
class TrainData:
    dataset: object          # tf.data.Dataset of (x, y) batches of global_batch / size, all epochs back to back
    steps_per_epoch: int     # the same on every rank
    num_examples: int        # examples in the whole training set (all ranks)


def epoch_order(num_examples: int, seed: int, epoch):
    """A permutation of range(num_examples) seeded by (seed, epoch); epoch may be a tensor."""
    import tensorflow as tf
    keys = tf.random.stateless_uniform([num_examples], seed=tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)]))
    return tf.argsort(keys, stable=True)


def local_steps(data_cfg, topo, global_batch: int) -> int:
    """Steps per epoch this rank's shard can feed (no communication; the trainer takes the MIN over ranks).
    In-memory sources give every rank the same number; TFRecord shards can differ."""
    arrays = load_arrays(data_cfg, "train")
    if arrays is not None:
        return steps_per_epoch(len(arrays.y), global_batch)
    local = scan_tfrecords(list_files(data_cfg.path), topo.rank, topo.size, data_cfg)
    return local // per_rank_batch(global_batch, topo.size)


def train_data(data_cfg, topo, global_batch: int, first_epoch: int, epochs: int, skip_steps: int = 0,
               steps: int | None = None) -> TrainData:
    """The training stream for this rank from (first_epoch, skip_steps) to the end of training, `steps` global
    batches per epoch (the agreed count; default: what this rank's shard allows, right for a single process)."""
    import tensorflow as tf
    per_rank = per_rank_batch(global_batch, topo.size)
    steps = local_steps(data_cfg, topo, global_batch) if steps is None else steps
    if steps == 0:
        raise UserError(f"a rank's TFRecord shard has fewer than {per_rank} examples (one per-rank batch); "
                        "lower trainer.global_batch_size or add data")
    arrays = load_arrays(data_cfg, "train")
    if arrays is not None:
        x, y = tf.constant(arrays.x), tf.constant(arrays.y)
        n, rank, size, seed = len(arrays.y), topo.rank, topo.size, data_cfg.seed

        def one_epoch(e):
            order = epoch_order(n, seed, e)[: steps * global_batch]
            idx = tf.reshape(order, [steps, size, per_rank])[:, rank, :]
            return tf.data.Dataset.from_tensor_slices(idx)
        stream = tf.data.Dataset.range(first_epoch, epochs).flat_map(one_epoch).skip(skip_steps)
        stream = stream.map(lambda i: (tf.gather(x, i), tf.gather(y, i)), num_parallel_calls=tf.data.AUTOTUNE)
        return TrainData(stream.prefetch(tf.data.AUTOTUNE), steps, n)

    files = list_files(data_cfg.path)
    total = steps * global_batch  # examples trained per epoch over all ranks
    records, _ = _records(files, topo.rank, topo.size)
    parse, seed, buffer = _parser(tuple(data_cfg.input_shape)), data_cfg.seed, data_cfg.shuffle_buffer

    def one_epoch(e):
        shuffled = records.shuffle(buffer, seed=seed * 1_000_003 + e, reshuffle_each_iteration=False)
        return shuffled.map(parse).batch(per_rank, drop_remainder=True).take(steps)
    stream = tf.data.Dataset.range(first_epoch, epochs).flat_map(one_epoch).skip(skip_steps)
    return TrainData(stream.prefetch(tf.data.AUTOTUNE), steps, total)


def eval_data(data_cfg, topo, split: str, batch: int):
    """(dataset of this rank's contiguous share, its size) for exact evaluation, or None without such a split."""
    import tensorflow as tf
    arrays = load_arrays(data_cfg, split)
    if arrays is not None:
        start, stop = eval_range(len(arrays.y), topo.rank, topo.size)
        ds = tf.data.Dataset.from_tensor_slices((arrays.x[start:stop], arrays.y[start:stop]))
        return ds.batch(batch).prefetch(tf.data.AUTOTUNE), stop - start
    path = data_cfg.path if split == "train" else data_cfg.test_path
    if data_cfg.source != "tfrecord" or not path:
        return None
    files = list_files(path)
    count = scan_tfrecords(files, topo.rank, topo.size, data_cfg)
    records, _ = _records(files, topo.rank, topo.size)
    return records.map(_parser(tuple(data_cfg.input_shape))).batch(batch).prefetch(tf.data.AUTOTUNE), count
