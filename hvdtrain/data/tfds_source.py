"""TensorFlow Datasets already prepared in a local data_dir (data.path). Nothing is ever downloaded.

Units are the split's TFRecord files, whose example counts TFDS records in its metadata: training shards by file
through TFDS's own input context (round robin) when there are at least as many files as ranks, else every rank
keeps every size-th example; evaluation reads the split in its order and decodes only this rank's dealt batches.
"""
from __future__ import annotations

import os

from hvdtrain.data import images
from hvdtrain.data.base import Share, Source, dealt, share_of
from hvdtrain.data.sharding import per_rank_batch, shard_files
from hvdtrain.errors import DataError


class TfdsSource(Source):
    def __init__(self, cfg):
        super().__init__(cfg)
        self._builder = None

    def builder(self):
        if self._builder is None:
            self._builder = _open(self.cfg.tfds_name, self.cfg.path)
        return self._builder

    def _split(self, split: str) -> str:
        return self.cfg.train_split if split == "train" else self.cfg.test_split

    def has_split(self, split: str) -> bool:
        return bool(self._split(split))

    def _files(self, split: str):
        name = self._split(split)
        try:
            return self.builder().info.splits[name].file_instructions
        except (KeyError, ValueError):
            raise DataError(f"TFDS dataset {self.cfg.tfds_name} has no split {name!r} (it has "
                            f"{', '.join(self.builder().info.splits)}): set data.train_split / data.test_split") from None

    def class_names(self):
        label = self.builder().info.features["label"]
        return list(label.names) if hasattr(label, "names") else None

    def example_shape(self) -> tuple:
        return images.shape(self.cfg)

    def validate(self, world, split: str) -> dict:
        """TFDS wrote these files and their counts; check they are all there and the features are the expected ones."""
        files = self._files(split)
        missing = [f.filename for f in files if not os.path.isfile(os.path.join(self.builder().data_dir, f.filename))]
        if missing:
            raise DataError(f"TFDS dataset {self.cfg.tfds_name} in {self.cfg.path} is incomplete: {missing[0]} is missing "
                            f"({len(missing)} file(s)); prepare it again")
        features = self.builder().info.features
        if "image" not in features or "label" not in features:
            raise DataError(f"TFDS dataset {self.cfg.tfds_name} has features {list(features)}; hvdtrain reads 'image' and 'label'")
        classes = features["label"].num_classes
        if classes > self.cfg.num_classes:
            raise DataError(f"TFDS dataset {self.cfg.tfds_name} has {classes} classes but data.num_classes is "
                            f"{self.cfg.num_classes}; set --data.num_classes={classes}")
        return {}

    def local_steps(self, world, global_batch: int) -> int:
        return self._local_count(world) // per_rank_batch(global_batch, world.size)

    def _local_count(self, world) -> int:
        files = self._files("train")
        own = shard_files(files, world.rank, world.size)
        if own is not None:
            return sum(f.take for f in own)
        return len(range(world.rank, sum(f.take for f in files), world.size))

    def _parse(self, example):
        return images.normalize(_resize(example["image"], self.cfg), self.cfg), example["label"]

    def train_batches(self, world, global_batch, steps, first_epoch, epochs, skip_steps=0):
        import tensorflow as tf
        import tensorflow_datasets as tfds
        per_rank = per_rank_batch(global_batch, world.size)
        files = self._files("train")
        by_file = shard_files(files, world.rank, world.size) is not None
        context = tf.distribute.InputContext(num_input_pipelines=world.size, input_pipeline_id=world.rank)
        cfg = self.cfg
        # Built once, outside the per-epoch function: TFDS deals this rank's files to it (round robin, in a fixed
        # order), or every rank reads all files and keeps every size-th example when there are fewer files than ranks
        # (TFDS refuses an input context then).
        read = tfds.ReadConfig(input_context=context if by_file else None)
        examples = self.builder().as_dataset(split=self._split("train"), shuffle_files=False, read_config=read)
        if not by_file:
            examples = examples.shard(world.size, world.rank)

        def one_epoch(e):
            ds = examples.shuffle(cfg.shuffle_buffer, seed=cfg.seed * 1_000_003 + e, reshuffle_each_iteration=False)
            parsed = images.augmented(ds.map(self._parse, num_parallel_calls=tf.data.AUTOTUNE), cfg, e, world)
            return parsed.batch(per_rank, drop_remainder=True).take(steps)

        stream = tf.data.Dataset.range(first_epoch, epochs).flat_map(one_epoch).skip(skip_steps)
        return stream.prefetch(tf.data.AUTOTUNE)

    def eval_share(self, world, split, batch) -> Share:
        import tensorflow as tf
        total = sum(f.take for f in self._files(split))

        def make(_):   # every rank reads the whole split but decodes only its own batches
            ds = self.builder().as_dataset(split=self._split(split), shuffle_files=False)
            return dealt(ds, batch, world).map(self._parse, num_parallel_calls=tf.data.AUTOTUNE)
        return share_of(total, batch, world, make)


def _resize(image, cfg):
    import tensorflow as tf
    image = tf.cast(image, tf.float32)
    if image.shape[-1] != cfg.channels:
        image = tf.image.rgb_to_grayscale(image) if cfg.channels == 1 else tf.image.grayscale_to_rgb(image)
    return tf.image.resize(image, cfg.image_size)


def _open(name: str, data_dir: str):
    """The prepared dataset `name` in data_dir, or a one-line DataError; never downloads."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError("data.source=tfds needs tensorflow-datasets: pip install tensorflow-datasets") from None
    tfds.disable_progress_bar()
    if not os.path.isdir(data_dir):
        raise DataError(f"TFDS data_dir {data_dir} does not exist (data.path must be the directory the dataset was "
                        "prepared into)")
    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except tfds.core.DatasetNotFoundError:   # its message lists every registered dataset
        raise DataError(f"TFDS dataset {name!r} is not prepared in {data_dir}; prepare it there first "
                        "(hvdtrain never downloads)") from None
    except OSError as exc:
        raise DataError(f"TFDS dataset {name!r} in {data_dir} is incomplete: {str(exc).splitlines()[0]}") from None
    if not builder.is_prepared():
        raise DataError(f"TFDS dataset {name!r} has no prepared files in {data_dir}; prepare it there first "
                        "(hvdtrain never downloads)")
    return builder
