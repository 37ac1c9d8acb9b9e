"""Sharding: disjoint and complete across ranks, equal step counts, reproducible per-epoch order, exact resume;
inputs checked up front with errors that name the file, the record, what was found and what was expected."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import agreed_sources as validated
from hvdtrain import data
from hvdtrain.config import DataConfig
from hvdtrain.errors import DataError
from hvdtrain.world import World


def topo(rank, size):
    return World(rank=rank, size=size)


def ids_npz(tmp_path, n, name="ids.npz"):
    """Examples whose single feature is their own index, so batches reveal which examples a rank got."""
    path = tmp_path / name
    np.savez(path, x=np.arange(n, dtype=np.float32).reshape(n, 1), y=np.arange(n) % 3)
    return DataConfig(source="npz", path=str(path), num_classes=3)


def rank_stream(cfg, rank, size, batch, epochs, first=0, skip=0):
    source = data.open_source(cfg)
    steps = source.local_steps(topo(rank, size), batch)
    return steps, [x.numpy().ravel().astype(int) for x, _ in source.train_batches(topo(rank, size), batch, steps,
                                                                                  first, epochs, skip)]


@pytest.mark.parametrize("n, size, batch", [(100, 2, 10), (101, 3, 12), (37, 4, 8), (64, 1, 64), (9, 3, 3)])
def test_each_global_batch_is_split_disjointly_across_ranks(tmp_path, n, size, batch):
    cfg = ids_npz(tmp_path, n)
    streams = [rank_stream(cfg, r, size, batch, epochs=2) for r in range(size)]
    assert {steps for steps, _ in streams} == {n // batch}, "every rank must run the same number of steps"
    for step in range(2 * (n // batch)):
        parts = [s[step] for _, s in streams]
        assert all(len(p) == batch // size for p in parts)
        assert len(set(np.concatenate(parts))) == batch, "ranks' shares of a global batch overlap"
    for epoch in range(2):
        seen = np.concatenate([np.concatenate(s[epoch * (n // batch):(epoch + 1) * (n // batch)]) for _, s in streams])
        assert len(set(seen)) == len(seen) == (n // batch) * batch, "an example repeats within an epoch"


def test_a_global_batch_holds_the_same_examples_in_the_same_order_whatever_the_number_of_ranks(tmp_path):
    """What lets a run move to another number of ranks: the ranks' shares of a step, in rank order, are the same
    global batch on 1, 2, 3 or 6 ranks."""
    cfg = ids_npz(tmp_path, 100)
    one = rank_stream(cfg, 0, 1, 12, epochs=2)[1]
    for size in (2, 3, 6):
        streams = [rank_stream(cfg, r, size, 12, epochs=2)[1] for r in range(size)]
        assert [np.concatenate(parts).tolist() for parts in zip(*streams)] == [b.tolist() for b in one]


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


def one_process_batches(n, batch):
    return [list(range(a, min(a + batch, n))) for a in range(0, n, batch)]


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 300), batch=st.integers(1, 40), size=st.integers(1, 9))
def test_evaluation_batches_are_the_single_process_batches_dealt_whole_in_turn(n, batch, size):
    """Every example is computed in the batch it has in one process (same size, members, order) at any number of
    ranks: CPU kernels may give other bits for an example in another batch (AMD EPYC does)."""
    spans = [data.dealt_batches(n, batch, r, size) for r in range(size)]
    per_rank = [[list(range(a, b)) for a, b in mine] for mine in spans]
    assert data.in_batch_order(per_rank) == one_process_batches(n, batch)
    for r, mine in enumerate(per_rank):
        assert all(data.sharding.batch_owner(i, batch, size) == r for b in mine for i in b)
    rounds = [len(mine) for mine in per_rank]
    assert max(rounds, default=0) - min(rounds, default=0) <= 1


@pytest.mark.parametrize("n, batch, size", [(3, 4, 5), (1, 4, 3), (7, 2, 3), (23, 5, 2), (24, 4, 3), (101, 10, 4)])
def test_array_shares_hold_the_single_process_batches(tmp_path, n, batch, size):
    """The datasets themselves (not only the arithmetic): rank r's batches are one process's batches r, r+size, ..."""
    cfg = ids_npz(tmp_path, n)
    source = data.open_source(DataConfig(**{**cfg.__dict__, "test_path": cfg.path}))
    got = [[[int(v) for v in x.numpy().ravel()] for x, _ in source.eval_share(topo(r, size), "test", batch).dataset]
           for r in range(size)]
    assert data.in_batch_order(got) == one_process_batches(n, batch)
    assert [len(b) for b in got[0]] == [len(b) for b in one_process_batches(n, batch)[::size]]


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
    with pytest.raises(DataError, match="has 5 examples, fewer than one global batch of 8"):
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
    sources = validated(cfg, size)
    counts = [s.local_train_examples(topo(r, size)) for r, s in enumerate(sources)]
    assert sum(counts) == n
    agreed = min(c // (batch // size) for c in counts)
    assert agreed == min(s.local_steps(topo(r, size), batch) for r, s in enumerate(sources))
    seen = []
    for r, source in enumerate(sources):
        batches = [x.numpy()[:, 0].astype(int) // 2 for x, _ in source.train_batches(topo(r, size), batch, agreed, 0, 1)]
        assert len(batches) == agreed
        seen += [i for b in batches for i in b]
    assert len(seen) == len(set(seen)), "two ranks read the same record"


def test_tfrecord_eval_shares_are_the_single_process_batches_in_input_order(tmp_path):
    cfg = write_records(tmp_path, 23, 2)
    cfg = DataConfig(**{**cfg.__dict__, "test_path": cfg.path})
    per_rank = []
    for r, source in enumerate(validated(cfg, 3, "test")):
        share = source.eval_share(topo(r, 3), "test", 4)
        batches = [[int(v) // 2 for v in x.numpy()[:, 0]] for x, _ in share.dataset]
        assert sum(map(len, batches)) == share.count and share.spans == data.dealt_batches(23, 4, r, 3)
        per_rank.append(batches)
    order = [i for f in range(2) for i in range(f, 23, 2)]   # input order: file by file, record by record
    assert data.in_batch_order(per_rank) == [order[a:a + 4] for a in range(0, 23, 4)]


def test_a_split_is_scanned_once(tmp_path, monkeypatch):
    """Counts are kept after validation: evaluating every epoch must not re-read the files to count them."""
    cfg = write_records(tmp_path, 20, 2)
    cfg = DataConfig(**{**cfg.__dict__, "test_path": cfg.path})
    source = validated(cfg, 1, "test")[0]
    monkeypatch.setattr(source, "scan", lambda *a: pytest.fail("re-scanned"))
    for _ in range(3):
        assert source.eval_share(topo(0, 1), "test", 4).count == 20


def test_corrupt_tfrecord_names_the_file_and_the_record(tmp_path):
    cfg = write_records(tmp_path, 20, 2)
    path = tmp_path / "part-1.tfrecord"
    blob = bytearray(path.read_bytes())
    blob[30:60] = b"\xff" * 30
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError) as err:
        data.open_source(cfg).validate(topo(1, 2), "train")
    assert str(err.value).startswith(f"corrupt TFRecord file {path}: unreadable after record 0, at byte 12 ")
    truncated = tmp_path / "part-0.tfrecord"
    truncated.write_bytes(truncated.read_bytes()[:-37])   # the last record cut short
    with pytest.raises(DataError, match=r"part-0.tfrecord: unreadable after record 9, at byte 441 \(truncated"):
        data.open_source(cfg).validate(topo(0, 2), "train")


def test_tfrecord_shape_mismatch_names_record_found_and_expected(tmp_path):
    cfg = write_records(tmp_path, 8, 1, shape=(3,))
    with pytest.raises(DataError) as err:
        data.open_source(DataConfig(**{**cfg.__dict__, "input_shape": (2,)})).validate(topo(0, 1), "train")
    message = str(err.value)
    assert "part-0.tfrecord, record 0: found features x: 3 floats, y: 1 int64, expected x: 2 floats (data.input_shape=[2])" in message
    assert "function_node" not in message and "IteratorGetNext" not in message and "\n" not in message
    with pytest.raises(DataError, match="no TFRecord files match"):
        data.list_files(str(tmp_path / "missing" / "*.tfrecord"))


def test_write_tfrecords_takes_one_path_or_refuses_clearly(tmp_path):
    data.write_tfrecords(np.zeros((3, 2), np.float32), np.arange(3), str(tmp_path / "one.tfrecord"))
    one = DataConfig(source="tfrecord", path=str(tmp_path / "one.tfrecord"), input_shape=(2,))
    assert data.open_source(one).validate(topo(0, 1), "train") == {0: 3}
    with pytest.raises(DataError, match="needs a file path or a list of file paths"):
        data.write_tfrecords(np.zeros((3, 2), np.float32), np.arange(3), [1, 2])


@pytest.mark.parametrize("arrays, message", [
    (dict(x=np.zeros((4, 1), np.float32), y=np.array([0, 1, 2, 9])), "label 9 is outside [0, 3)"),
    (dict(x=np.zeros((0, 1), np.float32), y=np.zeros(0)), "the dataset is empty"),
    (dict(x=np.zeros((4, 1), np.float32), y=np.zeros(3)), "x has 4 rows but y has 3"),
    (dict(a=np.zeros(3)), "must contain arrays named 'x' and 'y'"),
])
def test_bad_npz_inputs(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError) as err:
        data.open_source(DataConfig(source="npz", path=str(path), num_classes=3)).arrays("train")
    assert message in str(err.value)


def test_missing_npz_and_shape_mismatch(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        data.open_source(DataConfig(source="npz", path=str(tmp_path / "no.npz"))).arrays("train")
    path = tmp_path / "ok.npz"
    np.savez(path, x=np.zeros((4, 2), np.float32), y=np.zeros(4))
    with pytest.raises(DataError, match=r"examples have shape \[2\] but data.input_shape is \[3\]"):
        data.open_source(DataConfig(source="npz", path=str(path), input_shape=(3,))).arrays("train")


def test_digits_split_is_fixed_real_data():
    cfg = DataConfig()
    train, test = data.open_source(cfg).arrays("train"), data.open_source(cfg).arrays("test")
    assert len(train.y) + len(test.y) == 1797 and train.x.shape[1:] == (8, 8, 1)
    again = data.open_source(DataConfig(seed=99)).arrays("test")
    assert (again.y == test.y).all(), "the digits test split must not depend on the data seed"


@pytest.mark.parametrize("fraction", [0.2, 0.1, 0.37, 0.9])
def test_digits_are_scikit_learns_with_its_stratified_split_without_importing_it(fraction):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from hvdtrain.data import digits
    images, labels = digits.load()
    bunch = load_digits()
    assert (images == bunch.images).all() and (labels == bunch.target).all()
    train, test = train_test_split(np.arange(len(labels)), test_size=fraction, random_state=0, stratify=labels)
    mine = digits.split(labels, fraction, 0)
    assert mine[0].tolist() == train.tolist() and mine[1].tolist() == test.tolist()
    cfg = DataConfig(test_fraction=fraction)
    held_out = data.open_source(cfg).arrays("test")
    assert (held_out.y == bunch.target[test]).all()
    assert (held_out.x[..., 0] == (bunch.images[test] / 16.0).astype(np.float32)).all()


def test_synthetic_is_any_shape_any_task_and_learnable():
    cfg = DataConfig(source="synthetic", input_shape=(4, 4, 3), num_classes=5, synthetic_samples=400)
    arrays = data.open_source(cfg).arrays("train")
    assert arrays.x.shape == (400, 4, 4, 3) and set(np.unique(arrays.y)) <= set(range(5))
    assert len(np.unique(arrays.y)) >= 3
    reg = data.open_source(DataConfig(**{**cfg.__dict__, "task": "regression", "num_classes": 2})).arrays("train")
    assert reg.y.shape == (400, 2) and reg.y.dtype == np.float32 and reg.y.std() > 0.1
    multi = data.open_source(DataConfig(**{**cfg.__dict__, "task": "multilabel"})).arrays("train")
    assert multi.y.shape == (400, 5) and set(np.unique(multi.y)) == {0.0, 1.0}


def test_non_finite_features_are_refused_up_front(tmp_path):
    x = np.ones((6, 2), np.float32)
    x[4, 1] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.zeros(6))
    with pytest.raises(DataError, match="example 4 has a non-finite feature"):
        data.open_source(DataConfig(source="npz", path=str(tmp_path / "nan.npz"))).arrays("train")
