"""Which data `hvdtrain predict` and `hvdtrain evaluate` read: the run's own data (`--split`), a built-in source
(digits, synthetic), a .npz file, a directory of images, or TFRecord files. Each becomes a Source validated like
training data (every file parsed, every image decoded, before any scoring), or, for unlabelled .npz inputs and
image directories, this rank's dealt batches of the inputs (see sharding.dealt_batches)."""
from __future__ import annotations

import dataclasses
import glob
import os

from hvdtrain.data import images
from hvdtrain.data.arrays import array_share, read_npz
from hvdtrain.data.base import Share, share_of, span_index
from hvdtrain.data.sharding import eval_range
from hvdtrain.errors import DataError

BUILT_IN = ("digits", "synthetic")


def input_config(data_cfg, source: str | None, shape: tuple):
    """The data config that reads `source` as the held-out ('test') split, in the format of the run's data."""
    if source is None:
        return data_cfg
    if source in BUILT_IN:
        return dataclasses.replace(data_cfg, source=source, path="", test_path="",
                                   input_shape=shape if source == "synthetic" else ())
    if source.endswith(".npz"):
        return dataclasses.replace(data_cfg, source="npz", path=source, test_path=source, input_shape=())
    if os.path.isdir(source) and data_cfg.image_source and not _has_tfrecords(source):
        return dataclasses.replace(data_cfg, source="images", path=source, test_path=source)
    if data_cfg.image_source and "://" not in source and not glob.glob(source):
        raise DataError(f"--input {source} does not exist; this run was trained on images (data.source="
                        f"{data_cfg.source}): pass a folder of images (class folders, or a flat folder for predict) or "
                        "image TFRecord files")
    kind = "image_tfrecord" if data_cfg.image_source else "tfrecord"
    return dataclasses.replace(data_cfg, source=kind, path=source, test_path=source, input_shape=shape)


def is_unlabelled(source: str | None) -> bool:
    """Inputs that carry no labels: a .npz with only `x`, or a flat directory of images (predict only)."""
    return bool(source) and (source.endswith(".npz") or (os.path.isdir(source) and not _has_class_folders(source)
                                                         and not _has_tfrecords(source)))


def unlabelled_share(source: str, data_cfg, world, batch: int) -> Share:
    """This rank's dealt batches of unlabelled inputs: rows of a .npz `x`, or images of a directory (sorted, decoded
    in parallel, with their paths)."""
    if source.endswith(".npz"):
        return array_share(read_npz(source, labels=False).x, world, batch)
    import tensorflow as tf
    files = images.list_images(source)

    def make(spans):
        own = [files[i] for i in span_index(spans)]
        ds = tf.data.Dataset.from_tensor_slices(own or tf.zeros((0,), tf.string))
        return ds.map(lambda p: images.decode(tf.io.read_file(p), data_cfg), num_parallel_calls=tf.data.AUTOTUNE)
    return share_of(len(files), batch, world, make, paths=files)


def lists_files(source: str | None, data_cfg) -> bool:
    """Whether predictions can name each input's file: a directory of images (or the run's own image folders)."""
    if not source:
        return data_cfg.source == "images"
    return os.path.isdir(source) and not _has_tfrecords(source)


def check_images(source: str, world, data_cfg) -> None:
    """Decode this rank's share of an image directory once (a corrupt image is named before any output is written)."""
    import tensorflow as tf
    files = images.list_images(source)
    start, stop = eval_range(len(files), world.rank, world.size)
    for path in files[start:stop]:
        try:
            tf.io.decode_image(tf.io.read_file(path), channels=data_cfg.channels, expand_animations=False)
        except tf.errors.OpError:
            raise DataError(f"corrupt or unreadable image {path}; fix or remove it") from None


def _has_class_folders(path: str) -> bool:
    return any(entry.is_dir() for entry in os.scandir(path))


def _has_tfrecords(path: str) -> bool:
    from hvdtrain.data.tfrecord import is_record_file
    return any(is_record_file(name) for name in os.listdir(path))
