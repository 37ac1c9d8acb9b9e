"""Sharding: disjoint and complete across ranks, equal step counts, reproducible per-epoch order, exact resume."""
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings, strategies as st

from hvdtrain import data
from hvdtrain.config import DataConfig
from hvdtrain.dist import Topology
from hvdtrain.errors import UserError


def topo(rank, size):
    return Topology(rank=rank, size=size)


def ids_npz(tmp_path, n, name="ids.npz"):
    """Examples whose single feature is their own index, so batches reveal which examples a rank got."""
    path = tmp_path / name
    np.savez(path, x=np.arange(n, dtype=np.float32).reshape(n, 1), y=np.arange(n) % 3)
    return DataConfig(source="npz", path=str(path), num_classes=3)


def rank_stream(cfg, rank, size, batch, epochs, first=0, skip=0):
    td = data.train_data(cfg, topo(rank, size), batch, first, epochs, skip)
    return td, [x.numpy().ravel().astype(int) for x, _ in td.dataset]


@pytest.mark.parametrize("n, size, batch", [(100, 2, 10), (101, 3, 12), (37, 4, 8), (64, 1, 64), (9, 3, 3)])
def test_each_global_batch_is_split_disjointly_across_ranks(tmp_path, n, size, batch):
    cfg = ids_npz(tmp_path, n)
    streams = [rank_stream(cfg, r, size, batch, epochs=2) for r in range(size)]
    steps = {td.steps_per_epoch for td, _ in streams}
    assert steps == {n // batch}, "every rank must run the same number of steps"
    for step in range(2 * (n // batch)):
        parts = [s[step] for _, s in streams]
        assert all(len(p) == batch // size for p in parts)
        union = np.concatenate(parts)
        assert len(set(union)) == batch, "ranks' shares of a global batch overlap"
    for epoch in range(2):
        seen = np.concatenate([np.concatenate(s[epoch * (n // batch):(epoch + 1) * (n // batch)]) for _, s in streams])
        assert len(set(seen)) == len(seen) == (n // batch) * batch, "an example repeats within an epoch"


def test_order_is_reshuffled_per_epoch_and_reproducible(tmp_path):
    cfg = ids_npz(tmp_path, 64)
    _, a = rank_stream(cfg, 0, 2, 16, epochs=3)
    _, b = rank_stream(cfg, 0, 2, 16, epochs=3)
    assert all((x == y).all() for x, y in zip(a, b))
    epochs = [np.concatenate(a[i * 4:(i + 1) * 4]) for i in range(3)]
    assert not (epochs[0] == epochs[1]).all() and not (epochs[1] == epochs[2]).all()
    _, other_seed = rank_stream(DataConfig(**{**cfg.__dict__, "seed": 7}), 0, 2, 16, epochs=1)
    assert not (np.concatenate(other_seed) == epochs[0]).all()


def test_resume_mid_epoch_continues_the_same_stream(tmp_path):
    cfg = ids_npz(tmp_path, 50)
    _, full = rank_stream(cfg, 1, 2, 10, epochs=3)
    _, resumed = rank_stream(cfg, 1, 2, 10, epochs=3, first=1, skip=2)
    assert len(resumed) == len(full) - 5 - 2
    assert all((x == y).all() for x, y in zip(full[7:], resumed))


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 500), size=st.integers(1, 9))
def test_eval_ranges_cover_every_example_exactly_once(n, size):
    ranges = [data.eval_range(n, r, size) for r in range(size)]
    covered = [i for start, stop in ranges for i in range(start, stop)]
    assert covered == list(range(n))
    lengths = [stop - start for start, stop in ranges]
    assert max(lengths) - min(lengths) <= 1


@settings(max_examples=100, deadline=None)
@given(files=st.integers(1, 12), size=st.integers(1, 6))
def test_file_sharding_is_disjoint_complete_or_refused(files, size):
    names = [f"f{i:02d}" for i in range(files)]
    shards = [data.shard_files(names, r, size) for r in range(size)]
    if files < size:
        assert all(s is None for s in shards)
    else:
        flat = [f for s in shards for f in s]
        assert sorted(flat) == names and len(flat) == len(set(flat))


def test_fewer_examples_than_a_global_batch_is_refused():
    with pytest.raises(UserError, match="has 5 examples, fewer than one global batch of 8"):
        data.steps_per_epoch(5, 8)


def write_records(tmp_path, n, files, shape=(2,)):
    x = np.arange(n * int(np.prod(shape)), dtype=np.float32).reshape(n, *shape)
    y = np.arange(n) % 4
    paths = [str(tmp_path / f"part-{i}.tfrecord") for i in range(files)]
    data.write_tfrecords(x, y, paths)
    return DataConfig(source="tfrecord", path=str(tmp_path), input_shape=shape, num_classes=4, shuffle_buffer=64)


@pytest.mark.parametrize("n, files, size", [(60, 4, 2), (61, 3, 2), (50, 1, 2), (40, 2, 3)])
def test_tfrecord_sharding_by_file_or_element_with_agreed_steps(tmp_path, n, files, size):
    cfg = write_records(tmp_path, n, files)
    batch = 2 * size
    counts = [data.scan_tfrecords(data.list_files(cfg.path), r, size, cfg) for r in range(size)]
    assert sum(counts) == n
    agreed = min(c // (batch // size) for c in counts)
    seen = []
    for r in range(size):
        td = data.train_data(cfg, topo(r, size), batch, 0, 1, steps=agreed)
        batches = [x.numpy()[:, 0].astype(int) // 2 for x, _ in td.dataset]
        assert td.steps_per_epoch == agreed and len(batches) == agreed
        seen += [i for b in batches for i in b]
    assert len(seen) == len(set(seen)), "two ranks read the same record"


def test_tfrecord_eval_shards_cover_every_record_once(tmp_path):
    cfg = write_records(tmp_path, 23, 2)
    cfg = DataConfig(**{**cfg.__dict__, "test_path": cfg.path})
    seen = []
    for r in range(3):
        ds, count = data.eval_data(cfg, topo(r, 3), "test", 4)
        ids = [int(v) // 2 for x, _ in ds for v in x.numpy()[:, 0]]
        assert len(ids) == count
        seen += ids
    assert sorted(seen) == list(range(23))


def test_corrupt_tfrecord_is_a_clear_error(tmp_path):
    cfg = write_records(tmp_path, 20, 2)
    path = tmp_path / "part-1.tfrecord"
    blob = bytearray(path.read_bytes())
    blob[30:60] = b"\xff" * 30
    path.write_bytes(bytes(blob))
    with pytest.raises(UserError, match="corrupt TFRecord data in .*part-1.tfrecord"):
        data.train_data(cfg, topo(1, 2), 4, 0, 1)


def test_tfrecord_shape_mismatch_and_missing_files(tmp_path):
    cfg = write_records(tmp_path, 8, 1, shape=(3,))
    with pytest.raises(UserError, match=r"do not match data.input_shape=\[2\]"):
        data.train_data(DataConfig(**{**cfg.__dict__, "input_shape": (2,)}), topo(0, 1), 2, 0, 1)
    with pytest.raises(UserError, match="no TFRecord files match"):
        data.list_files(str(tmp_path / "missing" / "*.tfrecord"))


@pytest.mark.parametrize("arrays, message", [
    (dict(x=np.zeros((4, 1), np.float32), y=np.array([0, 1, 2, 9])), "label 9 is outside [0, 3)"),
    (dict(x=np.zeros((0, 1), np.float32), y=np.zeros(0)), "the dataset is empty"),
    (dict(x=np.zeros((4, 1), np.float32), y=np.zeros(3)), "x has 4 rows but y has 3"),
    (dict(a=np.zeros(3)), "must contain arrays named 'x' and 'y'"),
])
def test_bad_npz_inputs(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(UserError) as err:
        data.load_arrays(DataConfig(source="npz", path=str(path), num_classes=3), "train")
    assert message in str(err.value)


def test_missing_npz_and_shape_mismatch(tmp_path):
    with pytest.raises(UserError, match="data file not found"):
        data.load_arrays(DataConfig(source="npz", path=str(tmp_path / "no.npz")), "train")
    path = tmp_path / "ok.npz"
    np.savez(path, x=np.zeros((4, 2), np.float32), y=np.zeros(4))
    with pytest.raises(UserError, match=r"examples have shape \[2\] but data.input_shape is \[3\]"):
        data.load_arrays(DataConfig(source="npz", path=str(path), input_shape=(3,)), "train")


def test_digits_split_is_fixed_real_data():
    cfg = DataConfig()
    train, test = data.load_arrays(cfg, "train"), data.load_arrays(cfg, "test")
    assert len(train.y) + len(test.y) == 1797 and train.x.shape[1:] == (8, 8, 1)
    again = data.load_arrays(DataConfig(seed=99), "test")
    assert (again.y == test.y).all(), "the digits test split must not depend on the data seed"


def test_synthetic_is_any_shape_and_learnable_labels():
    cfg = DataConfig(source="synthetic", input_shape=(4, 4, 3), num_classes=5, synthetic_samples=400)
    arrays = data.load_arrays(cfg, "train")
    assert arrays.x.shape == (400, 4, 4, 3) and set(np.unique(arrays.y)) <= set(range(5))
    assert len(np.unique(arrays.y)) >= 3


def test_non_finite_features_are_refused_up_front(tmp_path):
    x = np.ones((6, 2), np.float32)
    x[4, 1] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.zeros(6))
    with pytest.raises(UserError, match="example 4 has a non-finite feature"):
        data.load_arrays(DataConfig(source="npz", path=str(tmp_path / "nan.npz")), "train")
