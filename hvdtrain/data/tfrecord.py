"""TFRecord sources: flat feature vectors (`x` float list, `y` label) and encoded images in the ImageNet layout
(`image/encoded` JPEG/PNG bytes, `image/class/label` int64; names and label offset configurable)."""
from __future__ import annotations

import glob
import os

import numpy as np

from hvdtrain.data import images
from hvdtrain.data.base import FileSource
from hvdtrain.errors import DataError, first_line
from hvdtrain.log import get_logger
from hvdtrain.tasks import Task


# TFRecord file names in a directory: *.tfrecord (also TFDS's name.tfrecord-00000-of-00004) and the sharded names of
# the classic ImageNet converters (train-00000-of-01024, validation-00000-of-00128), which have no extension.
_SHARD = "-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]"
RECORD_NAMES = ("*.tfrecord*", "*" + _SHARD)


def is_record_file(name: str) -> bool:
    """Whether a file name in a directory is taken for a TFRecord file (see RECORD_NAMES)."""
    import fnmatch
    return not name.startswith(".") and any(fnmatch.fnmatchcase(name, p) for p in RECORD_NAMES)


def list_files(pattern: str) -> list[str]:
    """A directory (its TFRecord files, see RECORD_NAMES), a glob or a single file, always in sorted order so every
    rank sees the same list."""
    if os.path.isdir(pattern):
        files = sorted(os.path.join(pattern, name) for name in os.listdir(pattern)
                       if is_record_file(name) and os.path.isfile(os.path.join(pattern, name)))
    else:
        files = sorted(glob.glob(pattern))
    if not files:
        raise DataError(f"no TFRecord files match {pattern!r}; set the path to a directory of *.tfrecord files (or "
                        "ImageNet-style train-00000-of-01024 shards) or a glob")
    return files


def write_tfrecords(x: np.ndarray, y: np.ndarray, paths) -> None:
    """Write examples round robin into the given files: `x` a flat float list; `y` an int64 class, or a float list
    (multilabel and regression targets). One path may be given as a string."""
    import tensorflow as tf
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths or not all(isinstance(p, (str, os.PathLike)) for p in paths):
        raise DataError("write_tfrecords needs a file path or a list of file paths")
    if len(x) != len(y):
        raise DataError(f"write_tfrecords: x has {len(x)} rows but y has {len(y)}")
    integer_labels = np.asarray(y).ndim == 1 and np.issubdtype(np.asarray(y).dtype, np.integer)
    writers = [tf.io.TFRecordWriter(str(p)) for p in paths]
    for i, (xi, yi) in enumerate(zip(x, y)):
        label = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(yi)])) if integer_labels else \
            tf.train.Feature(float_list=tf.train.FloatList(value=np.ravel(yi).astype(np.float32).tolist()))
        feature = {"x": tf.train.Feature(float_list=tf.train.FloatList(value=np.ravel(xi).tolist())), "y": label}
        writers[i % len(paths)].write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    for w in writers:
        w.close()


def write_image_tfrecords(encoded: list[bytes], labels, paths, image_key: str = "image/encoded",
                          label_key: str = "image/class/label") -> None:
    """Write encoded images and int labels round robin into files, in the ImageNet layout (for tests and examples)."""
    import tensorflow as tf
    writers = [tf.io.TFRecordWriter(str(p)) for p in paths]
    for i, (blob, label) in enumerate(zip(encoded, labels)):
        feature = {image_key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[blob])),
                   label_key: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)]))}
        writers[i % len(paths)].write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    for w in writers:
        w.close()


class _RecordFiles(FileSource):
    """Units are TFRecord files; validation parses every record of a file and reports the file and record."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.task = Task.from_config(cfg)
        self._files: dict[str, list[str]] = {}

    def path(self, split: str) -> str:
        return self.cfg.path if split == "train" else self.cfg.test_path

    def has_split(self, split: str) -> bool:
        return bool(self.path(split))

    def units(self, split: str) -> list[str]:
        if split not in self._files:
            self._files[split] = list_files(self.path(split))
        return self._files[split]

    def records(self, units):
        import tensorflow as tf
        return tf.data.TFRecordDataset(list(units))

    def records_by_index(self, own, order):
        import tensorflow as tf
        return tf.data.TFRecordDataset(tf.gather(tf.constant(own), order))

    def scan(self, units, split):
        """Parse every record of every unit; raise a DataError naming file, record and what was wrong."""
        import tensorflow as tf
        counts = []
        for path in units:
            count = 0
            try:
                batches = tf.data.TFRecordDataset(path).map(self.parse_checked, num_parallel_calls=tf.data.AUTOTUNE)
                for x, y in batches.batch(1024):
                    self.check_batch(x.numpy(), y.numpy(), f"{path}, records {count}-{count + len(y) - 1}")
                    count += len(y)
            except tf.errors.DataLossError as exc:
                good, where = _readable_records(path), _byte_offset(exc)
                raise DataError(f"corrupt TFRecord file {path}: unreadable after record {good}{where} (truncated or "
                                "overwritten); rewrite or remove the file") from None
            except tf.errors.InvalidArgumentError as exc:
                index, record = self._first_bad(path, count)
                raise DataError(f"{path}, record {index}: {self.what_is_wrong(exc, record)}") from None
            counts.append(count)
        return counts

    def _first_bad(self, path: str, start: int) -> tuple[int, bytes | None]:
        """The index and bytes of the first record that does not parse (the batch that failed started at `start`)."""
        import tensorflow as tf
        for i, record in enumerate(tf.data.TFRecordDataset(path).skip(start)):
            try:
                self.parse_checked(record)
            except tf.errors.InvalidArgumentError:
                return start + i, record.numpy()
        return start, None

    def check_batch(self, x, y, where: str) -> None:
        pass

    def parse_checked(self, record):
        return self.parse(record)


class FlatRecords(_RecordFiles):
    """Features `x` (flat float list of prod(data.input_shape) values) and `y` (the label)."""

    def example_shape(self) -> tuple:
        return tuple(self.cfg.input_shape)

    def _spec(self):
        import tensorflow as tf
        y = tf.io.FixedLenFeature([], tf.int64) if self.task.kind == "classification" else \
            tf.io.FixedLenFeature([self.task.outputs], tf.float32)
        return {"x": tf.io.FixedLenFeature([int(np.prod(self.cfg.input_shape))], tf.float32), "y": y}

    def parse(self, record):
        import tensorflow as tf
        ex = tf.io.parse_single_example(record, self._spec())
        return tf.reshape(ex["x"], self.cfg.input_shape), ex["y"]

    def check_batch(self, x, y, where):
        from hvdtrain.data.arrays import check_finite
        check_finite(x, where)
        self.task.check_labels(y, where)

    def what_is_wrong(self, exc, record) -> str:
        expected = (f"x: {int(np.prod(self.cfg.input_shape))} floats (data.input_shape={list(self.cfg.input_shape)}), "
                    + ("y: 1 int64 (a class)" if self.task.kind == "classification" else f"y: {self.task.outputs} floats"))
        return f"found features {_found(exc, record)}, expected {expected}; fix data.input_shape/data.num_classes or the data"


class ImageRecords(_RecordFiles):
    """Encoded images with int labels, e.g. the classic ImageNet TFRecords (1-based labels: data.label_offset=1)."""

    _size_said = False

    def example_shape(self) -> tuple:
        return images.shape(self.cfg)

    def _raw(self, record):
        import tensorflow as tf
        spec = {self.cfg.image_key: tf.io.FixedLenFeature([], tf.string),
                self.cfg.label_key: tf.io.FixedLenFeature([], tf.int64)}
        ex = tf.io.parse_single_example(record, spec)
        return ex[self.cfg.image_key], ex[self.cfg.label_key] - self.cfg.label_offset

    def parse(self, record):
        encoded, label = self._raw(record)
        return images.decode(encoded, self.cfg), label

    def validate(self, world, split: str) -> dict:
        found = super().validate(world, split)
        if world.is_chief and not self._size_said:
            self._size_said = True
            self._say_size(self.units(split)[0], get_logger(world.rank))
        return found

    def _say_size(self, first: str, log) -> None:
        """Rank 0, once: the first record's stored size, when images are resized to data.image_size."""
        import tensorflow as tf
        for record in tf.data.TFRecordDataset(first).take(1):
            note = images.size_note(self._raw(record)[0], first, self.cfg)
            if note:
                log.info(note)

    def parse_checked(self, record):
        """For validation: decode fully, but keep only the shape (cheap to batch) and the label."""
        import tensorflow as tf
        encoded, label = self._raw(record)
        image = tf.io.decode_image(encoded, channels=self.cfg.channels, expand_animations=False)
        return tf.shape(image), label

    def check_batch(self, x, y, where):
        self.task.check_labels(y, where + f" (after subtracting data.label_offset={self.cfg.label_offset})")

    def augment(self, parsed, epoch, world):
        return images.augmented(parsed, self.cfg, epoch, world)

    def what_is_wrong(self, exc, record) -> str:
        return (f"found features {_found(exc, record)}, expected an encoded JPEG/PNG in '{self.cfg.image_key}' and an "
                f"int64 label in '{self.cfg.label_key}' (data.image_key / data.label_key), or an image that decodes")


def _readable_records(path: str) -> int:
    """How many records of a damaged file can be read before the damage."""
    import tensorflow as tf
    count = 0
    try:
        for _ in tf.data.TFRecordDataset(path):
            count += 1
    except tf.errors.DataLossError:
        pass
    return count


def _byte_offset(exc) -> str:
    import re
    found = re.search(r"(?:corrupted|truncated) record at (\d+)", str(exc))
    return f", at byte {found.group(1)}" if found else ""


def _found(exc, record: bytes | None) -> str:
    """What a record holds, e.g. "x: 4 floats, y: 1 int64", or TensorFlow's own complaint if it is no Example."""
    import tensorflow as tf
    try:
        features = tf.train.Example.FromString(record).features.feature
        kinds = {"float_list": "float", "int64_list": "int64", "bytes_list": "bytes"}
        parts = []
        for name in sorted(features):
            kind = features[name].WhichOneof("kind")
            n = len(getattr(features[name], kind).value) if kind else 0
            parts.append(f"{name}: {n} {kinds.get(kind, 'empty')}{'s' if n != 1 and kind else ''}")
        return ", ".join(parts) or "none"
    except Exception:   # not an Example at all
        return f"none that parse ({first_line(exc)})"
