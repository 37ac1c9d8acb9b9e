"""Images: class folders of JPEG/PNG files, and the decoding, resizing, augmentation and scaling every image source
(folders, image TFRecords, TFDS) shares. Decoding runs in parallel inside tf.data, after sharding by file."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from hvdtrain.errors import DataError
from hvdtrain.log import shown

EXTENSIONS = (".jpg", ".jpeg", ".png")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Listing(NamedTuple):
    classes: list[str]                 # sorted folder names
    files: list[tuple[str, int]]       # (image file, class index), sorted
    not_images: Counter                # {extension: count} of the other files found (left out)


def list_class_folders(root: str) -> Listing:
    """The classes and images of a directory with one sub-directory per class; sorted, so every rank builds the same
    list. Files are found recursively inside each class folder; other files are left out and counted."""
    if not os.path.isdir(root):
        raise DataError(f"image directory not found: {root} (data.path / data.test_path must be a directory with one "
                        "sub-directory of JPEG/PNG files per class)")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class sub-directories; put each class's images in a folder of its own")
    files, not_images, empty = [], Counter(), []
    for label, name in enumerate(classes):
        found, others = _scan(Path(root) / name)
        files += [(str(path), label) for path in found]
        not_images += others
        empty += [] if found else [name]
    if not files:
        raise DataError(f"{root}: no {'/'.join(EXTENSIONS)} files in its {len(classes)} class folders")
    if empty:   # a class without examples cannot be learned, and would silently widen the model
        raise DataError(f"{root}: class folder(s) {shown(empty, 3)} hold no "
                        f"{'/'.join(EXTENSIONS)} files; add images to each class folder or remove the empty ones")
    return Listing(classes, files, not_images)


def not_images_note(split: str, root: str, not_images: Counter) -> str | None:
    """The one line that says which files were left out because they are not images, or None."""
    if not not_images:
        return None
    most_first = sorted(not_images.items(), key=lambda item: (-item[1], item[0]))
    counts = ", ".join(f"{ext or 'no extension'}: {n}" for ext, n in most_first)
    return f"{split}: skipped {sum(not_images.values())} file(s) that are not images ({counts}) in {root}"


def size_note(encoded, example: str, data_cfg) -> str | None:
    """The line that says images are resized to data.image_size (a 32x32 folder trains 49x its pixels at 224x224),
    read from one encoded image (`example` names it), or None when it has that size."""
    import tensorflow as tf
    found = tuple(int(d) for d in tf.io.decode_image(encoded, expand_animations=False).shape[:2])
    wanted = tuple(data_cfg.image_size)
    if found == wanted:
        return None
    return f"images are {found[0]}x{found[1]} (e.g. {example}), resized to {wanted[0]}x{wanted[1]} (data.image_size)"


def list_images(root: str) -> list[str]:
    """Every image under a directory (any layout), sorted: the inputs of `hvdtrain predict --input DIR`."""
    if not os.path.isdir(root):
        raise DataError(f"image directory not found: {root}")
    files = [str(p) for p in _images_under(Path(root))]
    if not files:
        raise DataError(f"{root}: no {'/'.join(EXTENSIONS)} files found")
    return files


def _images_under(folder: Path) -> list[Path]:
    return _scan(folder)[0]


def _scan(folder: Path) -> tuple[list[Path], Counter]:
    """(the image files under a folder, sorted; {extension: count} of its other files, hidden ones aside)."""
    found, others = [], Counter()
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        if path.suffix.lower() in EXTENSIONS:
            found.append(path)
        elif not path.name.startswith("."):
            others[path.suffix.lower()] += 1
    return sorted(found), others


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


def augmented(parsed, cfg, epoch, world):
    """Random crop + flip for training, seeded per (data.seed, epoch, rank, position): a resume repeats them."""
    import tensorflow as tf
    if not cfg.augment:
        return parsed

    def one(i, example):
        x, y = example
        seed = tf.stack([tf.cast(cfg.seed, tf.int64) * 7919 + tf.cast(epoch, tf.int64),
                         tf.cast(i, tf.int64) * world.size + world.rank])
        return augment(x, seed), y
    return parsed.enumerate().map(one, num_parallel_calls=tf.data.AUTOTUNE)


def shape(data_cfg) -> tuple:
    return (*data_cfg.image_size, data_cfg.channels)
