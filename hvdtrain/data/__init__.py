"""Sharded tf.data pipelines. Knows ranks only through a World value and never calls Horovod.

    source = data.open_source(cfg.data)        # built once per run: file lists, arrays, counts
    source.validate(world, "train")            # every rank checks its part (under the trainer's error agreement)
    source.train_batches(world, global_batch, steps, first_epoch, epochs, skip_steps)
    source.eval_share(world, "test", batch)    # dealt whole batches: exact evaluation, ordered prediction

Sources: digits, synthetic, npz (arrays.py); tfrecord, image_tfrecord (tfrecord.py); images (folders.py);
tfds (tfds_source.py). Every rank runs the same number of steps per epoch: uneven counts make Horovod stall.
"""
from __future__ import annotations

from hvdtrain.data.arrays import Arrays, ArraySource, array_share, read_npz
from hvdtrain.data.base import SPLITS, Share, Source, epoch_order
from hvdtrain.data.folders import ImageFolders
from hvdtrain.data.sharding import (dealt_batches, eval_range, in_batch_order, per_rank_batch, shard_files,
                                    steps_per_epoch)
from hvdtrain.data.tfrecord import FlatRecords, ImageRecords, list_files, write_image_tfrecords, write_tfrecords

_SOURCES = {"digits": ArraySource, "synthetic": ArraySource, "npz": ArraySource, "tfrecord": FlatRecords,
            "image_tfrecord": ImageRecords, "images": ImageFolders}


def open_source(data_cfg) -> Source:
    """The Source for a data config (nothing is read until it is asked for)."""
    if data_cfg.source == "tfds":
        from hvdtrain.data.tfds_source import TfdsSource
        return TfdsSource(data_cfg)
    return _SOURCES[data_cfg.source](data_cfg)


__all__ = ["Arrays", "ArraySource", "SPLITS", "Share", "Source", "array_share", "dealt_batches", "epoch_order",
           "eval_range", "in_batch_order", "list_files", "open_source", "per_rank_batch", "read_npz", "shard_files",
           "steps_per_epoch", "write_image_tfrecords", "write_tfrecords"]
