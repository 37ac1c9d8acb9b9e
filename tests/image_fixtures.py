"""Real image data for the image tests, built from scikit-learn's digits (1,797 8x8 scans, bundled, no download):

  digits_folders(root)      PNG class folders root/train/<name>/*.png and root/test/<name>/*.png, upscaled to 32x32
  digits_records(root, ...) the same images as TFRecords in the ImageNet layout (1-based labels by default)
  build_tfds(data_dir, ...) a tiny TensorFlow Datasets dataset prepared in a local data_dir (never downloads)

Class folders are named after the digits ("zero" ... "nine"), so the sorted class order (eight, five, four, ...)
differs from the digit values: a test that confuses class ids and names fails.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CLASSES = sorted(NAMES)            # what hvdtrain derives from the folders
SIZE = 32
SPLIT_SEED = 0                     # a fixed split: the held-out set never changes


def digits_split():
    """(train images, train digits, test images, test digits): uint8 [n, 32, 32, 1], a fixed stratified split."""
    import tensorflow as tf
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    bunch = load_digits()
    pixels = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    big = tf.cast(tf.round(tf.image.resize(pixels.astype(np.float32), (SIZE, SIZE), method="bilinear")), tf.uint8).numpy()
    return train_test_split(big, bunch.target, test_size=0.2, random_state=SPLIT_SEED, stratify=bunch.target)


def encode_png(image: np.ndarray) -> bytes:
    import tensorflow as tf
    return tf.io.encode_png(image).numpy()


def digits_folders(root: Path) -> dict:
    """Write the PNG folders once (a finished marker makes it reusable across test modules); returns a description:
    {"train": dir, "test": dir, "files": {split: [(path, class index)] sorted as hvdtrain lists them}}."""
    root = Path(root)
    marker = root / "done.json"
    if not marker.is_file():
        x_tr, x_te, y_tr, y_te = digits_split()
        for split, images, digits in (("train", x_tr, y_tr), ("test", x_te, y_te)):
            for name in NAMES:
                (root / split / name).mkdir(parents=True, exist_ok=True)
            for i, (image, digit) in enumerate(zip(images, digits)):
                (root / split / NAMES[digit] / f"{split}-{i:04d}.png").write_bytes(encode_png(image))
        marker.write_text(json.dumps({"train": len(y_tr), "test": len(y_te)}))
    files = {split: [(str(p), CLASSES.index(p.parent.name)) for name in CLASSES
                     for p in sorted((root / split / name).glob("*.png"))] for split in ("train", "test")}
    return {"train": root / "train", "test": root / "test", "files": files}


def digits_records(root: Path, files: int = 4, label_offset: int = 1, image_key: str = "image/encoded",
                   label_key: str = "image/class/label") -> dict:
    """The digits as ImageNet-style TFRecords: root/train-0000i-of-0000N and root/validation-..., PNG bytes, labels
    = digit + label_offset. Returns {"train": [files], "test": [files], "train_digits": ..., "test_digits": ...}."""
    from hvdtrain.data import write_image_tfrecords
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    x_tr, x_te, y_tr, y_te = digits_split()
    out = {}
    for split, prefix, images, digits in (("train", "train", x_tr, y_tr), ("test", "validation", x_te, y_te)):
        (root / split).mkdir(exist_ok=True)
        paths = [str(root / split / f"{prefix}-{i:05d}-of-{files:05d}") for i in range(files)]
        write_image_tfrecords([encode_png(im) for im in images], digits + label_offset, paths, image_key, label_key)
        out[split], out[f"{split}_digits"] = paths, digits
    return out


def id_images(n: int, first: int = 0, size: int = 8) -> np.ndarray:
    """uint8 [n, size, size, 1] images whose every pixel is the example's id (first + i, < 256): a decoded batch says
    which examples it holds."""
    ids = np.arange(first, first + n)
    assert ids.max(initial=0) < 256
    return np.broadcast_to(ids[:, None, None, None], (n, size, size, 1)).astype(np.uint8)


def build_tfds(data_dir: Path, splits: dict | None = None, num_shards: int = 4):
    """Prepare the TFDS dataset `hvd_digits` in data_dir (generated here: nothing is downloaded); returns the builder.
    splits: {name: (uint8 images [n, h, w, 1], labels)}, default the digits split; example i of a split has id i.
    Features: image (PNG-encoded), label (a ClassLabel named zero..nine), id."""
    import tensorflow_datasets as tfds
    if splits is None:
        x_tr, x_te, y_tr, y_te = digits_split()
        splits = {"train": (x_tr, y_tr), "test": (x_te, y_te)}
    shape = tuple(next(iter(splits.values()))[0].shape[1:])

    class HvdDigits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):   # not dataset_info_from_configs(): that needs the builder to live in a package
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "id": np.int64, "image": tfds.features.Image(shape=shape),
                "label": tfds.features.ClassLabel(names=list(NAMES))}), supervised_keys=("image", "label"))

        def _split_generators(self, dl_manager):   # dl_manager is never used: nothing is downloaded
            return {split: self._generate_examples(split) for split in splits}

        def _generate_examples(self, split):
            images, labels = splits[split]
            for i, (image, label) in enumerate(zip(images, labels)):
                yield i, {"id": i, "image": image, "label": int(label)}

    tfds.disable_progress_bar()
    builder = HvdDigits(data_dir=str(data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=num_shards,
                                                                               try_download_gcs=False))
    return builder
