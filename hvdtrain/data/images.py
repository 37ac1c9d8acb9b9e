"""Images: class folders of JPEG/PNG files, and the decoding, resizing, augmentation and scaling every image source
(folders, image TFRecords, TFDS) shares. Decoding runs in parallel inside tf.data, after sharding by file."""
from __future__ import annotations

import os
from pathlib import Path

from hvdtrain.errors import DataError

EXTENSIONS = (".jpg", ".jpeg", ".png")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def list_class_folders(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(file, label)]) of a directory with one sub-directory per class; both sorted, so every rank
    builds the same list. Files are found recursively inside each class folder."""
    if not os.path.isdir(root):
        raise DataError(f"image directory not found: {root} (data.path / data.test_path must be a directory with one "
                        "sub-directory of JPEG/PNG files per class)")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class sub-directories; put each class's images in a folder of its own")
    files = [(str(path), label) for label, name in enumerate(classes) for path in _images_under(Path(root) / name)]
    if not files:
        raise DataError(f"{root}: no {'/'.join(EXTENSIONS)} files in its {len(classes)} class folders")
    return classes, files


def list_images(root: str) -> list[str]:
    """Every image under a directory (any layout), sorted: the inputs of `hvdtrain predict --input DIR`."""
    if not os.path.isdir(root):
        raise DataError(f"image directory not found: {root}")
    files = [str(p) for p in _images_under(Path(root))]
    if not files:
        raise DataError(f"{root}: no {'/'.join(EXTENSIONS)} files found")
    return files


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())


def decode(encoded, data_cfg):
    """Encoded JPEG/PNG bytes -> float32 [height, width, channels] resized to data.image_size, scaled per config."""
    import tensorflow as tf
    image = tf.io.decode_image(encoded, channels=data_cfg.channels, expand_animations=False)
    image = tf.image.resize(tf.cast(image, tf.float32), data_cfg.image_size)
    return normalize(image, data_cfg)


def normalize(image, data_cfg):
    """uint8-range float pixels -> the configured scale."""
    import tensorflow as tf
    image = tf.cast(image, tf.float32)
    if data_cfg.normalize == "unit":
        return image / 255.0
    if data_cfg.normalize == "symmetric":
        return image / 127.5 - 1.0
    mean = tf.constant(IMAGENET_MEAN[:data_cfg.channels] if data_cfg.channels == 3 else (0.449,), tf.float32)
    std = tf.constant(IMAGENET_STD[:data_cfg.channels] if data_cfg.channels == 3 else (0.226,), tf.float32)
    return (image / 255.0 - mean) / std


def augment(image, seed):
    """Training only: pad by 1/8 of the size, crop back at a random place, flip left-right at random.
    Stateless and seeded per example, so a resumed run sees exactly the same augmented images."""
    import tensorflow as tf
    height, width = image.shape[0], image.shape[1]
    pad_h, pad_w = max(1, height // 8), max(1, width // 8)
    padded = tf.pad(image, [[pad_h, pad_h], [pad_w, pad_w], [0, 0]], mode="REFLECT")
    cropped = tf.image.stateless_random_crop(padded, tf.shape(image), seed=seed)
    return tf.image.stateless_random_flip_left_right(cropped, seed=seed + 1)


def shape(data_cfg) -> tuple:
    return (*data_cfg.image_size, data_cfg.channels)
