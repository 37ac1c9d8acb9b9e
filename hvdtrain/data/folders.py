"""Image folders: one sub-directory of JPEG/PNG files per class (class names: the sorted folder names).

The sorted file list is sharded per rank before anything is decoded; every image is decoded once at the start by
the rank that will read it (data.bad_files=fail stops the run naming the first bad file; skip leaves the bad ones
out, on every rank alike, and says how many), then decoded, resized and scaled in parallel inside tf.data.
"""
from __future__ import annotations

from collections import Counter

from hvdtrain.data import images
from hvdtrain.data.base import FileSource
from hvdtrain.errors import DataError
from hvdtrain.log import get_logger, shown


class ImageFolders(FileSource):
    shuffle_records = False   # one image per unit: the per-epoch unit order is already a full shuffle

    def __init__(self, cfg):
        super().__init__(cfg)
        self._listing: dict[str, tuple[list[str], list[tuple[str, int]]]] = {}
        self.skipped: dict[str, list[str]] = {}
        self.kept: dict[str, list[int]] = {}    # split -> listed positions of the files kept (data.bad_files=skip)
        self.not_images: dict[str, Counter] = {}   # split -> {extension: count} of the files that are not images
        self._size_said = False
        self.classes: list[str] | None = None   # a trained model's classes (use_classes): folders map to them by name

    def use_classes(self, names: list[str] | None) -> "ImageFolders":
        """Label folders by a trained model's class names (evaluate/predict on other folders, which may hold only
        some of the classes), not by their own sorted order."""
        self.classes, self._listing, self.kept = (list(names) if names else None), {}, {}
        return self

    def path(self, split: str) -> str:
        return self.cfg.path if split == "train" else self.cfg.test_path

    def has_split(self, split: str) -> bool:
        return bool(self.path(split))

    def _listed(self, split: str):
        if split not in self._listing:
            found, files, self.not_images[split] = images.list_class_folders(self.path(split))
            if self.classes is not None:
                unknown = [name for name in found if name not in self.classes]
                if unknown:
                    raise DataError(f"{self.path(split)}: class folder(s) {shown(unknown, 3)} are not among the "
                                    f"model's {len(self.classes)} classes ({shown(self.classes)}); name the folders "
                                    "after its classes")
                files = [(path, self.classes.index(found[label])) for path, label in files]
                found = self.classes
            self._listing[split] = (found, files)
        return self._listing[split]

    def class_names(self) -> list[str]:
        return self._listed("train")[0]

    def example_shape(self) -> tuple:
        return images.shape(self.cfg)

    def units(self, split: str) -> list[tuple[str, int]]:
        classes, files = self._listed(split)
        if split != "train" and classes != self.class_names():
            raise DataError(f"{self.path(split)} has classes {shown(classes)} but the training folders have "
                            f"{shown(self.class_names())}; both need the same class sub-directories")
        if len(classes) > self.cfg.num_classes:
            raise DataError(f"{self.path(split)} has {len(classes)} class folders but data.num_classes is "
                            f"{self.cfg.num_classes}; set --data.num_classes={len(classes)}")
        return files

    def inputs(self, split: str) -> dict:
        """Each image's path, and its position in the listing (a skipped file keeps its number; it has no row)."""
        return {"paths": [path for path, _ in self.units(split)], "listed": self.kept.get(split)}

    def records(self, units):
        import tensorflow as tf
        paths, labels = zip(*units) if units else ((), ())
        return tf.data.Dataset.from_tensor_slices((list(paths), tf.constant(list(labels), tf.int64)))

    def records_by_index(self, own, order):
        import tensorflow as tf
        paths, labels = zip(*own)
        return tf.data.Dataset.from_tensor_slices((tf.gather(tf.constant(list(paths)), order),
                                                   tf.gather(tf.constant(list(labels), tf.int64), order)))

    def parse(self, path, label):
        import tensorflow as tf
        return images.decode(tf.io.read_file(path), self.cfg), label

    def augment(self, parsed, epoch, world):
        return images.augmented(parsed, self.cfg, epoch, world)

    def validate(self, world, split: str) -> dict:
        self._rank = world.rank   # after_adopt reports what was left out, from rank 0 only
        return super().validate(world, split)

    def scan(self, units, split):
        """Decode every image (in parallel); 1 per good file, 0 per bad one (bad_files=skip) or a DataError."""
        import tensorflow as tf
        if not units:
            return []
        paths = [p for p, _ in units]
        ds = tf.data.Dataset.from_tensor_slices((tf.range(len(paths), dtype=tf.int64), paths))
        decoded = ds.map(lambda i, p: (i, tf.shape(tf.io.decode_image(tf.io.read_file(p), channels=self.cfg.channels,
                                                                      expand_animations=False))),
                         num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
        good = {int(i) for i, _ in decoded.as_numpy_iterator()}
        bad = [paths[i] for i in range(len(paths)) if i not in good]
        if bad and self.cfg.bad_files == "fail":
            raise DataError(f"corrupt or unreadable image {bad[0]} ({len(bad)} such file(s) in this rank's share); "
                            "fix or remove it, or set data.bad_files=skip to leave such files out")
        return [1 if i in good else 0 for i in range(len(paths))]

    def after_adopt(self, split: str) -> None:
        self._leave_out_bad(split)
        self._say_once(split)

    def _log(self):
        """Info lines from rank 0 only (`validate` records the rank; a single-process helper is rank 0)."""
        return get_logger(getattr(self, "_rank", 0))

    def _say_once(self, split: str) -> None:
        """Rank 0 tells what the listing left out (files that are not images) and, once, the resize to
        data.image_size, read from the first image (rank 0's own: other ranks never open a file of another share)."""
        import tensorflow as tf
        if getattr(self, "_rank", 0):
            return
        notes = [images.not_images_note(split, self.path(split), self.not_images.get(split))]
        if not self._size_said:
            self._size_said = True
            first = self._listed(split)[1][0][0]
            notes.append(images.size_note(tf.io.read_file(first), first, self.cfg))
        for note in filter(None, notes):
            self._log().info(note)

    def _leave_out_bad(self, split: str) -> None:
        """bad_files=skip: every rank drops the same files (counts were gathered) and the split is re-indexed."""
        classes, files = self._listed(split)
        counts = self._counts[split]
        bad = [files[i][0] for i in range(len(files)) if counts.get(i, 1) == 0]
        if not bad:
            return
        kept = [f for i, f in enumerate(files) if counts.get(i, 1)]
        if not kept:
            raise DataError(f"{self.path(split)}: all {len(files)} images are unreadable")
        self._listing[split] = (classes, kept)
        self.kept[split] = [i for i in range(len(files)) if counts.get(i, 1)]
        self._counts[split] = {i: 1 for i in range(len(kept))}
        self.skipped[split] = bad
        self._log().info(
            f"{split}: left out {len(bad)} unreadable image(s) of {len(files)} (data.bad_files=skip), e.g. {bad[0]}")

