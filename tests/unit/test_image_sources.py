"""Image sources in one process, ranks simulated with World values: class folders (listing, sharding by file,
validation, bad files, augmentation, scaling), ImageNet-style image TFRecords (layout, label offset, errors) and
TensorFlow Datasets prepared in a local data_dir (file sharding through TFDS, the fallback, contiguous evaluation).

Images here carry their identity: every pixel of example i is i, so a decoded batch says which examples it holds."""
from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import pytest

from conftest import agreed_sources as agreed
from hvdtrain import data
from hvdtrain.config import DataConfig
from hvdtrain.data import images
from hvdtrain.data.inputs import input_config, is_unlabelled
from hvdtrain.errors import DataError
from hvdtrain.log import get_logger
from hvdtrain.world import World
from image_fixtures import build_tfds, encode_png, id_images

SIZE = 8


def world(rank, size):
    return World(rank=rank, size=size)


def ids_of(x) -> list[int]:
    """The example ids in a batch of decoded id images (normalize=unit: pixel / 255)."""
    return [int(v) for v in np.round(np.asarray(x)[:, 0, 0, 0] * 255.0)]


def write_id_folder(root, per_class: dict, first: int = 0) -> dict[int, str]:
    """Class folders of id PNGs; returns {id: path}. Ids are dealt to classes in the order given."""
    paths, i = {}, first
    for name, n in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for image in id_images(n, i, SIZE):
            path = root / name / f"img-{i:03d}.png"
            path.write_bytes(encode_png(image))
            paths[i] = str(path)
            i += 1
    return paths


def folder_cfg(root, test_root=None, **kw):
    base = dict(source="images", path=str(root), test_path=str(test_root or ""), num_classes=3, image_size=(SIZE, SIZE),
                channels=1, augment=False, normalize="unit", shuffle_buffer=64)
    return DataConfig(**{**base, **kw})


def streams(sources, global_batch, epochs=1):
    size = len(sources)
    steps = min(s.local_steps(world(r, size), global_batch) for r, s in enumerate(sources))
    out = [[ids_of(x) for x, _ in s.train_batches(world(r, size), global_batch, steps, 0, epochs)]
           for r, s in enumerate(sources)]
    return steps, out


# ------------------------------------------------------------------------------------------------ class folders
def test_class_folders_are_listed_sorted_recursively_and_completely(tmp_path):
    paths = write_id_folder(tmp_path, {"b": 2, "a": 3})
    (tmp_path / "a" / "nested").mkdir()
    (tmp_path / "a" / "nested" / "deep.PNG").write_bytes(encode_png(id_images(1, 99, SIZE)[0]))
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.png").write_bytes(encode_png(id_images(1, 98, SIZE)[0]))
    classes, files, not_images = images.list_class_folders(str(tmp_path))
    assert classes == ["a", "b"] and not_images == {".txt": 1}
    expected = [(paths[2], 0), (paths[3], 0), (paths[4], 0), (str(tmp_path / "a" / "nested" / "deep.PNG"), 0),
                (paths[0], 1), (paths[1], 1)]
    assert sorted(files) == sorted(expected) and files[-2:] == [(paths[0], 1), (paths[1], 1)]
    assert [f for f, _ in files[:4]] == sorted(f for f, _ in files[:4])


@pytest.mark.parametrize("layout, message", [
    (None, "image directory not found"),
    ({}, "has no class sub-directories"),
    ({"a": 0}, "no .jpg/.jpeg/.png files in its 1 class folders"),
])
def test_unusable_folders_are_refused_with_one_line(tmp_path, layout, message):
    root = tmp_path / "images"
    if layout is not None:
        root.mkdir()
        for name in layout:
            (root / name).mkdir()
    with pytest.raises(DataError, match=message):
        images.list_class_folders(str(root))


def test_an_empty_class_folder_is_a_data_error_naming_it(tmp_path):
    """An empty class would be a class the model can never learn (and would widen it): refused, whatever
    data.bad_files says; a folder holding only files that are not images is empty too."""
    write_id_folder(tmp_path, {"a": 2, "c": 2})
    (tmp_path / "b").mkdir()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "readme.txt").write_text("no images here")
    for bad_files in ("fail", "skip"):
        with pytest.raises(DataError) as err:
            agreed(folder_cfg(tmp_path, num_classes=4, bad_files=bad_files), 1)
        assert str(err.value) == (f"{tmp_path}: class folder(s) b, d hold no .jpg/.jpeg/.png files; add images to "
                                  "each class folder or remove the empty ones")


@pytest.mark.parametrize("size, global_batch", [(2, 4), (3, 6)])
def test_each_rank_reads_only_its_files_and_ranks_agree_on_steps(tmp_path, size, global_batch):
    paths = write_id_folder(tmp_path, {"a": 9, "b": 7, "c": 8})
    cfg = folder_cfg(tmp_path)
    files = [f for f, _ in data.open_source(cfg).units("train")]
    steps, ranks = streams(agreed(cfg, size), global_batch, epochs=2)
    id_of = {p: i for i, p in paths.items()}
    per_epoch = steps
    assert steps == min(len(files[r::size]) for r in range(size)) // (global_batch // size)
    for r, stream in enumerate(ranks):
        own = {id_of[f] for f in files[r::size]}
        assert len(stream) == 2 * steps and all(len(b) == global_batch // size for b in stream)
        for epoch in range(2):
            seen = [i for b in stream[epoch * per_epoch:(epoch + 1) * per_epoch] for i in b]
            assert len(seen) == len(set(seen)) and set(seen) <= own, f"rank {r} read a file that is not its own"
        assert stream[:per_epoch] != stream[per_epoch:], "the order must change between epochs"
    firsts = [set(i for b in s[:per_epoch] for i in b) for s in ranks]
    assert all(not (firsts[a] & firsts[b]) for a in range(size) for b in range(a + 1, size))


def test_validation_decodes_only_this_ranks_share(tmp_path):
    """A corrupt file is found by the rank that owns it; the others (which never open it) pass."""
    write_id_folder(tmp_path, {"a": 3, "b": 3, "c": 2})
    cfg = folder_cfg(tmp_path)
    files = [f for f, _ in data.open_source(cfg).units("train")]
    bad = files[3]                                                  # rank 1 of 2 owns files 1, 3, 5, 7
    open(bad, "wb").write(b"\x89PNG\r\n\x1a\n but then nothing a decoder can use")
    assert data.open_source(cfg).validate(world(0, 2), "train") == {0: 1, 2: 1, 4: 1, 6: 1}
    with pytest.raises(DataError) as err:
        data.open_source(cfg).validate(world(1, 2), "train")
    assert str(err.value).startswith(f"corrupt or unreadable image {bad} (1 such file(s) in this rank's share)")
    assert "data.bad_files=skip" in str(err.value) and "\n" not in str(err.value)


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_bad_files_skip_leaves_them_out_on_every_rank_and_says_how_many(tmp_path):
    paths = write_id_folder(tmp_path, {"a": 5, "b": 5, "c": 4})
    truncated = paths[4]
    blob = open(truncated, "rb").read()
    open(truncated, "wb").write(blob[: len(blob) // 2])
    garbage = paths[11]
    open(garbage, "wb").write(b"not an image at all")
    cfg = folder_cfg(tmp_path, bad_files="skip")
    seen = Lines()
    get_logger(0).addHandler(seen)   # after hvdtrain configured its logger (that replaces the handlers)
    try:
        sources = agreed(cfg, 2)
    finally:
        logging.getLogger("hvdtrain").removeHandler(seen)
    assert all(s.skipped["train"] == [truncated, garbage] for s in sources)
    assert all(len(s.units("train")) == 12 for s in sources)
    # said once (by rank 0; rank 1 knows the same but keeps quiet), naming how many and one of them
    assert [line for line in seen.lines if "left out" in line] == [
        f"train: left out 2 unreadable image(s) of 14 (data.bad_files=skip), e.g. {truncated}"]
    steps, ranks = streams(sources, 2, epochs=1)
    seen = [i for s in ranks for b in s for i in b]
    assert steps == 6 and sorted(seen) == [i for i in range(14) if i not in (4, 11)]


def said(cfg, size: int) -> list[str]:
    """The info lines hvdtrain logs while `size` simulated ranks validate and adopt the training split."""
    seen = Lines()
    get_logger(0).addHandler(seen)
    try:
        agreed(cfg, size)
    finally:
        logging.getLogger("hvdtrain").removeHandler(seen)
    return seen.lines


def test_files_that_are_not_images_are_counted_per_extension_and_said_once(tmp_path):
    write_id_folder(tmp_path, {"a": 3, "b": 3})
    for name in ("a/notes.txt", "b/labels.json", "b/deep/more.txt", "b/README", "a/.DS_Store"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("not an image")
    lines = said(folder_cfg(tmp_path), 2)
    assert [line for line in lines if "not images" in line] == [
        f"train: skipped 4 file(s) that are not images (.txt: 2, no extension: 1, .json: 1) in {tmp_path}"]
    assert not any("resized" in line for line in lines)   # the images are data.image_size already


def test_not_images_are_skipped_but_an_unreadable_image_stays_an_error(tmp_path):
    paths = write_id_folder(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    open(paths[4], "wb").write(b"junk")
    with pytest.raises(DataError, match=f"corrupt or unreadable image {paths[4]}"):
        agreed(folder_cfg(tmp_path, bad_files="fail"), 1)


def test_a_resize_to_data_image_size_is_said_once(tmp_path):
    paths = write_id_folder(tmp_path, {"a": 2, "b": 2})
    lines = said(folder_cfg(tmp_path, image_size=(24, 16)), 2)
    assert [line for line in lines if "resized" in line] == [
        f"images are {SIZE}x{SIZE} (e.g. {paths[0]}), resized to 24x16 (data.image_size)"]


def test_a_resize_of_image_records_is_said_once_by_rank_0(tmp_path):
    paths = write_records(tmp_path / "shards")
    seen = Lines()
    get_logger(0).addHandler(seen)
    try:
        agreed(records_cfg(tmp_path / "shards", image_size=(16, 16)), 2)
        agreed(records_cfg(tmp_path / "shards"), 2)   # the records' own size: nothing to say
    finally:
        logging.getLogger("hvdtrain").removeHandler(seen)
    assert [line for line in seen.lines if "resized" in line] == [
        f"images are {SIZE}x{SIZE} (e.g. {paths[0]}), resized to 16x16 (data.image_size)"]


def test_all_bad_files_is_an_error_even_with_skip(tmp_path):
    paths = write_id_folder(tmp_path, {"a": 1, "b": 1})
    for p in paths.values():
        open(p, "wb").write(b"junk")
    with pytest.raises(DataError, match="all 2 images are unreadable"):
        agreed(folder_cfg(tmp_path, bad_files="skip", num_classes=2), 1)


def test_evaluation_shares_are_the_single_process_batches_dealt_in_input_order(tmp_path):
    write_id_folder(tmp_path / "train", {"a": 2, "b": 2, "c": 2})
    test_paths = write_id_folder(tmp_path / "test", {"a": 4, "b": 3, "c": 4}, first=100)
    cfg = folder_cfg(tmp_path / "train", tmp_path / "test")
    listed = [i for p, _ in data.open_source(cfg).units("test") for i, q in test_paths.items() if q == p]
    for size in (1, 2, 3, 4):
        sources = agreed(cfg, size, "test")
        shares = [s.eval_share(world(r, size), "test", 3) for r, s in enumerate(sources)]
        got = data.in_batch_order([[ids_of(x) for x, _ in share.dataset] for share in shares])
        labels = [int(v) for share in shares for _, y in share.dataset for v in y.numpy()]
        assert got == [listed[a:a + 3] for a in range(0, 11, 3)]
        assert [s.spans for s in shares] == [data.dealt_batches(11, 3, r, size) for r in range(size)]
        assert [s.count for s in shares] == [sum(b - a for a, b in s.spans) for s in shares]
        assert sorted(labels) == [0] * 4 + [1] * 3 + [2] * 4
        assert all(s.paths == [test_paths[i] for i in listed] and s.listed is None for s in shares)


def test_skipped_files_keep_their_listed_index_and_the_others_their_paths(tmp_path):
    """data.bad_files=skip: share.listed maps rows back to the listing (row 20 is the 21st listed file)."""
    paths = write_id_folder(tmp_path, {"a": 12, "b": 12})
    for bad in (3, 7):
        open(paths[bad], "wb").write(b"junk")
    for size in (1, 2, 3):
        shares = [s.eval_share(world(r, size), "test", 5)
                  for r, s in enumerate(agreed(folder_cfg(tmp_path, tmp_path, bad_files="skip", num_classes=2),
                                               size, "test"))]
        kept = [i for i in range(24) if i not in (3, 7)]
        assert all(s.listed == kept and s.paths == [paths[i] for i in kept] for s in shares)
        rows = [i for b in data.in_batch_order([[ids_of(x) for x, _ in s.dataset] for s in shares]) for i in b]
        assert rows == kept and shares[0].listed[18] == 20 and shares[0].paths[18] == paths[20]


def test_test_folders_must_have_the_training_classes(tmp_path):
    write_id_folder(tmp_path / "train", {"a": 2, "b": 2, "c": 2})
    write_id_folder(tmp_path / "test", {"a": 2, "b": 2, "d": 2})
    with pytest.raises(DataError) as err:
        data.open_source(folder_cfg(tmp_path / "train", tmp_path / "test")).units("test")
    assert str(err.value) == (f"{tmp_path / 'test'} has classes a, b, d but the training folders have a, b, c; both "
                              "need the same class sub-directories")   # complete lists: no '...'
    with pytest.raises(DataError, match="has 3 class folders but data.num_classes is 2; set --data.num_classes=3"):
        data.open_source(folder_cfg(tmp_path / "train", num_classes=2)).units("train")


def test_other_folders_are_labelled_by_the_models_class_names(tmp_path):
    """evaluate/predict --input DIR: a folder with some of the classes keeps the model's label numbers."""
    paths = write_id_folder(tmp_path / "some", {"c": 2, "b": 1})
    source = data.open_source(folder_cfg(tmp_path / "some", tmp_path / "some")).use_classes(["a", "b", "c"])
    assert source.class_names() == ["a", "b", "c"]
    assert source.units("test") == [(paths[2], 1), (paths[0], 2), (paths[1], 2)]
    share = agreed(folder_cfg(tmp_path / "some", tmp_path / "some"), 1, "test")[0].use_classes(["a", "b", "c"])
    share.adopt("test", [share.validate(world(0, 1), "test")])
    labels = [int(v) for _, y in share.eval_share(world(0, 1), "test", 2).dataset for v in y.numpy()]
    assert labels == [1, 2, 2]
    write_id_folder(tmp_path / "other", {"a": 1, "zebra": 1})
    with pytest.raises(DataError, match=r"class folder\(s\) zebra are not among the model's 3 classes \(a, b, c\)"):
        data.open_source(folder_cfg(tmp_path / "other")).use_classes(["a", "b", "c"]).units("train")


def test_augmentation_is_training_only_seeded_and_changes_per_epoch(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(4):
            (tmp_path / name / f"{i}.png").write_bytes(encode_png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)))
    cfg = folder_cfg(tmp_path, test_root=tmp_path, augment=True, channels=3, image_size=(16, 16), num_classes=2)

    def epochs(c):
        src = agreed(c, 1)[0]
        return [x.numpy() for x, _ in src.train_batches(world(0, 1), 8, 1, 0, 2)]
    plain = {tuple(np.round(x.numpy().ravel()[:16], 5)) for x, _ in
             agreed(dataclasses.replace(cfg, augment=False), 1)[0].train_batches(world(0, 1), 8, 1, 0, 1).unbatch()}
    first, again = epochs(cfg), epochs(cfg)
    assert all(np.array_equal(a, b) for a, b in zip(first, again)), "augmentation must be reproducible (resume)"
    assert first[0].shape == (8, 16, 16, 3) and 0.0 <= first[0].min() and first[0].max() <= 1.0
    assert not np.array_equal(np.sort(first[0], axis=None), np.sort(first[1], axis=None))
    changed = [tuple(np.round(x.ravel()[:16], 5)) not in plain for x in first[0]]
    assert sum(changed) >= 4, "most training images should be cropped or flipped"
    share = agreed(cfg, 1, "test")[0].eval_share(world(0, 1), "test", 8)
    evaluated = [tuple(np.round(x.ravel()[:16], 5)) for x in np.concatenate([x for x, _ in share.dataset])]
    assert set(evaluated) == plain, "held-out images must not be augmented"


@pytest.mark.parametrize("mode, expected", [("unit", 51 / 255), ("symmetric", 51 / 127.5 - 1),
                                            ("imagenet", (51 / 255 - 0.485) / 0.229)])
def test_normalisation_modes(mode, expected):
    cfg = DataConfig(source="images", path="x", normalize=mode, channels=3, image_size=(2, 2))
    out = images.decode(encode_png(np.full((4, 4, 3), 51, np.uint8)), cfg).numpy()
    assert out.shape == (2, 2, 3) and out[0, 0, 0] == pytest.approx(expected, rel=1e-5)


def test_decoding_converts_channels_and_resizes():
    rgb = np.zeros((10, 6, 3), np.uint8)
    rgb[..., 0] = 255
    grey = images.decode(encode_png(rgb), DataConfig(source="images", path="x", channels=1, image_size=(5, 3))).numpy()
    assert grey.shape == (5, 3, 1) and 0.2 < grey.mean() < 0.4          # red is about 0.3 grey
    colour = images.decode(encode_png(np.full((4, 4, 1), 255, np.uint8)),
                           DataConfig(source="images", path="x", channels=3, image_size=(8, 8))).numpy()
    assert colour.shape == (8, 8, 3) and np.allclose(colour, 1.0)


def test_predict_inputs_tell_class_folders_flat_folders_and_record_shards_apart(tmp_path):
    write_id_folder(tmp_path / "classes", {"a": 1, "b": 1})
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(encode_png(id_images(1, 0, SIZE)[0]))
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "validation-00000-of-00001").write_bytes(b"")
    run = folder_cfg(tmp_path / "classes")
    assert input_config(run, str(tmp_path / "classes"), (SIZE, SIZE, 1)).source == "images"
    assert input_config(run, str(tmp_path / "shards"), (SIZE, SIZE, 1)).source == "image_tfrecord"
    assert is_unlabelled(str(tmp_path / "flat")) and not is_unlabelled(str(tmp_path / "classes"))
    assert not is_unlabelled(str(tmp_path / "shards"))


def test_a_missing_input_of_an_images_run_names_what_the_run_reads(tmp_path):
    run = folder_cfg(tmp_path / "classes")
    with pytest.raises(DataError) as err:
        input_config(run, "bad/nope", (SIZE, SIZE, 1))
    assert str(err.value) == ("--input bad/nope does not exist; this run was trained on images (data.source=images): "
                              "pass a folder of images (class folders, or a flat folder for predict) or image TFRecord "
                              "files")
    (tmp_path / "shards").mkdir()
    pattern = str(tmp_path / "shards" / "validation-*")
    (tmp_path / "shards" / "validation-00000-of-00001").write_bytes(b"")
    assert input_config(run, pattern, (SIZE, SIZE, 1)).source == "image_tfrecord"   # a pattern that matches


# ------------------------------------------------------------------------------------------------ image TFRecords
def write_records(root, n=30, files=3, offset=1, image_key="image/encoded", label_key="image/class/label"):
    """ImageNet-style shards (train-0000i-of-0000N, no extension); example i: id image, label i % 3 + offset."""
    root.mkdir(parents=True, exist_ok=True)
    paths = [str(root / f"train-{i:05d}-of-{files:05d}") for i in range(files)]
    data.write_image_tfrecords([encode_png(im) for im in id_images(n, 0, SIZE)], np.arange(n) % 3 + offset, paths,
                               image_key, label_key)
    return paths


def records_cfg(root, **kw):
    base = dict(source="image_tfrecord", path=str(root), test_path=str(root), num_classes=3, image_size=(SIZE, SIZE),
                channels=1, augment=False, label_offset=1, shuffle_buffer=64)
    return DataConfig(**{**base, **kw})


def test_imagenet_shards_are_found_and_labels_shifted_by_the_offset(tmp_path):
    paths = write_records(tmp_path / "shards")
    (tmp_path / "shards" / "README").write_text("not a shard")
    (tmp_path / "shards" / ".train-00009-of-00010").write_text("hidden")
    source = data.open_source(records_cfg(tmp_path / "shards"))
    assert source.units("train") == paths
    assert source.counts("test") == [10, 10, 10]
    share = source.eval_share(world(0, 1), "test", 7)
    x = np.concatenate([x for x, _ in share.dataset])
    y = np.concatenate([y for _, y in share.dataset])
    order = [i for f in range(3) for i in range(f, 30, 3)]      # written round robin, read file by file
    assert ids_of(x) == order and list(y) == [i % 3 for i in order] and x.shape[1:] == (SIZE, SIZE, 1)


def test_image_records_shard_by_file_across_ranks(tmp_path):
    write_records(tmp_path / "shards", n=40, files=4)
    cfg = records_cfg(tmp_path / "shards")
    steps, ranks = streams(agreed(cfg, 2), 4)
    assert steps == 10
    for r, stream in enumerate(ranks):   # rank r owns files r and r + 2: ids congruent to r mod 2 (4 files, dealt)
        assert sorted(i for b in stream for i in b) == [i for i in range(40) if i % 4 in (r, r + 2)]


def test_image_records_without_the_offset_name_the_file_and_the_fix(tmp_path):
    paths = write_records(tmp_path / "shards")
    with pytest.raises(DataError) as err:
        data.open_source(records_cfg(tmp_path / "shards", label_offset=0)).validate(world(0, 1), "train")
    # file 2 holds examples 2, 5, 8, ...: stored labels 3 (1-based), outside [0, 3) without the offset
    assert str(err.value).startswith(f"{paths[2]}, records 0-9 (after subtracting data.label_offset=0): label 3 is "
                                     "outside [0, 3); set data.num_classes or fix the labels")


def test_image_records_with_a_corrupt_image_or_other_keys_name_file_and_record(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    blobs = [encode_png(im) for im in id_images(6, 0, SIZE)]
    blobs[4] = b"\xff\xd8 a broken jpeg"
    data.write_image_tfrecords(blobs, [1] * 6, [str(root / "part-00000-of-00001")])
    with pytest.raises(DataError) as err:
        data.open_source(records_cfg(root)).validate(world(0, 1), "train")
    assert str(err.value).startswith(f"{root / 'part-00000-of-00001'}, record 4: ")
    assert "expected an encoded JPEG/PNG in 'image/encoded'" in str(err.value)
    write_records(tmp_path / "keys", n=6, files=1, image_key="jpeg", label_key="label")
    with pytest.raises(DataError, match="record 0: .*data.image_key / data.label_key"):
        data.open_source(records_cfg(tmp_path / "keys")).validate(world(0, 1), "train")
    custom = data.open_source(records_cfg(tmp_path / "keys", image_key="jpeg", label_key="label"))
    assert custom.validate(world(0, 1), "train") == {0: 6}


# ------------------------------------------------------------------------------------------------ TFDS
@pytest.fixture(scope="module")
def tfds_dirs(tmp_path_factory):
    """Two prepared copies of a tiny dataset: 4 files per split, and 1 file per split (fewer files than ranks)."""
    splits = {"train": (id_images(100, 0, SIZE), np.arange(100) % 10), "test": (id_images(23, 200, SIZE), np.arange(23) % 10)}
    dirs = {}
    for shards in (4, 1):
        dirs[shards] = tmp_path_factory.mktemp(f"tfds{shards}")
        build_tfds(dirs[shards], splits, num_shards=shards)
    return dirs


def tfds_cfg(data_dir, **kw):
    base = dict(source="tfds", path=str(data_dir), tfds_name="hvd_digits", num_classes=10, image_size=(SIZE, SIZE),
                channels=1, augment=False, shuffle_buffer=50)
    return DataConfig(**{**base, **kw})


def file_ids(path) -> set[int]:
    """The ids stored in one TFDS TFRecord file, read without TFDS's reader."""
    import tensorflow as tf
    import tensorflow_datasets as tfds
    builder = tfds.builder("hvd_digits", data_dir=os.path.dirname(os.path.dirname(os.path.dirname(path))))
    return {int(builder.info.features.deserialize_example(r)["id"]) for r in tf.data.TFRecordDataset(path)}


def test_tfds_is_opened_by_name_from_the_local_data_dir(tfds_dirs):
    source = data.open_source(tfds_cfg(tfds_dirs[4]))
    assert source.class_names() == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert source.example_shape() == (SIZE, SIZE, 1) and source.has_split("test")
    assert source.validate(world(0, 1), "train") == {}
    assert len(source._files("train")) == 4 and sum(f.take for f in source._files("train")) == 100


def test_tfds_training_shards_by_file_through_the_input_context(tfds_dirs):
    cfg = tfds_cfg(tfds_dirs[4])
    sources = agreed(cfg, 2)
    files = [f.filename for f in sources[0]._files("train")]
    steps, ranks = streams(sources, 10, epochs=2)
    local = [sum(len(file_ids(f)) for f in files[r::2]) for r in range(2)]
    assert steps == min(local) // 5 and [s.local_steps(world(r, 2), 10) for r, s in enumerate(sources)] == \
        [n // 5 for n in local]
    for r, stream in enumerate(ranks):
        own = set().union(*(file_ids(f) for f in files[r::2]))
        assert len(stream) == 2 * steps
        for epoch in range(2):
            seen = [i for b in stream[epoch * steps:(epoch + 1) * steps] for i in b]
            assert len(seen) == len(set(seen)) == steps * 5 and set(seen) <= own
        assert stream[:steps] != stream[steps:], "a new order every epoch"


def test_tfds_with_fewer_files_than_ranks_falls_back_to_examples(tfds_dirs):
    sources = agreed(tfds_cfg(tfds_dirs[1]), 2)
    steps, ranks = streams(sources, 10)
    assert steps == 10
    seen = [[i for b in s for i in b] for s in ranks]
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0]) | set(seen[1])) == 100


@pytest.mark.parametrize("shards", [4, 1])
def test_tfds_evaluation_deals_the_single_process_batches(tfds_dirs, shards):
    import tensorflow_datasets as tfds
    cfg = tfds_cfg(tfds_dirs[shards])
    builder = tfds.builder("hvd_digits", data_dir=str(tfds_dirs[shards]))
    order = [int(e["id"]) + 200 for e in builder.as_dataset(split="test", shuffle_files=False)]
    for size in (1, 2, 3):
        shares = [s.eval_share(world(r, size), "test", 4) for r, s in enumerate(agreed(cfg, size, "test"))]
        assert data.in_batch_order([[ids_of(x) for x, _ in s.dataset] for s in shares]) == \
            [order[a:a + 4] for a in range(0, 23, 4)]
        assert [s.spans for s in shares] == [data.dealt_batches(23, 4, r, size) for r in range(size)]


@pytest.mark.parametrize("change, message", [
    (dict(tfds_name="no_such_set"), "TFDS dataset 'no_such_set' is not prepared in"),
    (dict(path="/no/such/dir"), "TFDS data_dir /no/such/dir does not exist"),
    (dict(train_split="validation"), "has no split 'validation' (it has "),
])
def test_tfds_problems_are_one_line_and_never_download(tfds_dirs, change, message):
    with pytest.raises(DataError) as err:
        data.open_source(tfds_cfg(tfds_dirs[4], **change)).validate(world(0, 1), "train")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_tfds_with_a_missing_file_says_it_is_incomplete(tmp_path):
    build_tfds(tmp_path, {"train": (id_images(8, 0, SIZE), np.arange(8) % 10)}, num_shards=2)
    victim = next(tmp_path.glob("hvd_digits/1.0.0/hvd_digits-train.tfrecord-00001-of-00002"))
    victim.unlink()
    with pytest.raises(DataError, match=f"is incomplete: {victim} is missing"):
        data.open_source(tfds_cfg(tmp_path)).validate(world(0, 1), "train")
