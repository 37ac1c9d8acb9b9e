"""Sharded optimizer state in one process (tests/parallel/test_sharded.py runs it on 2, 3 and 4 ranks): the layout
is Horovod's reduce-scatter split; the configured optimizer, updating one range of the flattened variables, computes
for those numbers exactly what it computes on the whole; clipping by norm sees whole variables; and a checkpoint's
optimizer state moves between stage 0 and sharded state and between numbers of shards, bit for bit."""
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hvdtrain.backend import sharded as layout_only   # the layout functions import nothing heavy of their own
from hvdtrain.errors import UserError

keras3 = pytest.mark.keras3


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=8), parts=st.integers(1, 7))
def test_ranges_are_horovods_split_and_cut_each_variable_at_most_once(sizes, parts):
    total = sum(sizes)
    split = layout_only.split(total, parts)
    assert sum(split) == total and max(split) - min(split) <= 1
    assert split == sorted(split, reverse=True)   # Horovod gives the first total % parts ranks one number more
    ranges = [layout_only.owned(total, parts, i) for i in range(parts)]
    assert [lo for lo, _ in ranges] == [0] + [hi for _, hi in ranges[:-1]] and ranges[-1][1] == total
    covered = []
    for lo, hi in ranges:
        pieces = layout_only.cut(sizes, lo, hi)
        assert len({i for i, _, _ in pieces}) == len(pieces)   # one piece per variable at most
        offsets = np.cumsum([0] + sizes)
        covered += [int(offsets[i]) + k for i, a, b in pieces for k in range(a, b)]
    assert covered == list(range(total))


def _plain(name, **kw):
    import keras
    return {"sgd": lambda: keras.optimizers.SGD(0.05, momentum=0.9, **kw),
            "adam": lambda: keras.optimizers.Adam(0.01, **kw),
            "rmsprop": lambda: keras.optimizers.RMSprop(0.01, momentum=0.9, **kw),
            "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1, **kw),
            "nadam": lambda: keras.optimizers.Nadam(0.01, **kw)}[name]()


SHAPES = [(5, 7), (7,), (7, 3), (3,)]


def _ranges_against_whole(name, parts=3, steps=12, **kw):
    """(the whole variables after `steps` updates by the plain optimizer, the same updated range by range by `parts`
    inner optimizers on pieces, as sharded state runs them: each rank its range)."""
    import keras
    import tensorflow as tf
    rng = np.random.default_rng(0)
    start = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    whole, ranged = [keras.Variable(a) for a in start], [keras.Variable(a) for a in start]
    sizes = [int(np.prod(s)) for s in SHAPES]
    plain = _plain(name, **kw)
    plain.build(whole)
    ranks = []
    for r in range(parts):
        pieces = [layout_only._Piece(ranged[i], i, a, b)
                  for i, a, b in layout_only.cut(sizes, *layout_only.owned(sum(sizes), parts, r))]
        inner = layout_only._on_pieces(type(plain)).from_config(_plain(name, **kw).get_config())
        inner._hvdtrain_slots = []
        inner._hvdtrain_squares = lambda grads, g=None: None
        inner.build(pieces)
        ranks.append((inner, pieces))

    @tf.function
    def step(grads):
        plain.apply(grads, whole)
        squares = tf.stack([tf.reduce_sum(tf.square(g)) for g in grads])   # what the group's all-reduce gives
        new = [[] for _ in ranged]
        for inner, pieces in ranks:
            inner._hvdtrain_squares = lambda _: squares
            for p in pieces:
                p.read()
            inner.apply([tf.reshape(grads[p.index], [-1])[p.start:p.stop] for p in pieces], pieces)
            for p in pieces:
                new[p.index].append(p.value)
        for v, parts_ in zip(ranged, new):
            v.assign(tf.reshape(tf.concat(parts_, 0), v.shape))

    for _ in range(steps):
        step([tf.constant(3 * rng.standard_normal(s).astype(np.float32)) for s in SHAPES])
    return [v.numpy() for v in whole], [v.numpy() for v in ranged]


@keras3
@pytest.mark.parametrize("name", ["sgd", "adam", "rmsprop", "adamw", "nadam"])
def test_an_optimizer_updating_a_range_computes_what_it_computes_on_the_whole(name):
    """The same elementwise arithmetic, number by number: equal to the last bit or two (TensorFlow's graph
    optimizer may fuse the two graphs' multiply-adds differently; SGD and Adam come out bit-identical here)."""
    whole, ranged = _ranges_against_whole(name)
    for a, b in zip(whole, ranged):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)


@keras3
@pytest.mark.parametrize("clip", [{"clipnorm": 1.0}, {"global_clipnorm": 2.0}, {"clipvalue": 0.5}])
def test_clipping_by_norm_sees_whole_variables(clip):
    whole, ranged = _ranges_against_whole("adam", **clip)
    for a, b in zip(whole, ranged):   # the norms are summed in another order: rounding, not another clip
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-7)


@keras3
@pytest.mark.parametrize("make, message", [
    (lambda k: k.optimizers.Lamb(0.01), "Lamb computes each update from a whole variable's shape or norm"),
    (lambda k: k.optimizers.Adam(0.01, use_ema=True), "an optimizer with use_ema=True keeps a whole-model average"),
    (lambda k: k.optimizers.SGD(0.1, gradient_accumulation_steps=2), "set that or backward_passes_per_step, not both"),
])
def test_what_sharding_cannot_keep_exact_is_refused_in_one_line(make, message):
    import keras
    with pytest.raises(UserError, match=message) as err:
        layout_only.sharded_optimizer(make(keras), stage=1, backward_passes_per_step=2)
    assert "\n" not in str(err.value)


class OneRank:
    """Horovod as a world of one sees it (no collective is ever called)."""
    global_process_set = "all ranks"

    def size(self):
        return 1

    def rank(self):
        return 0


@pytest.fixture
def alone(monkeypatch):
    from hvdtrain.backend import collectives
    monkeypatch.setattr(collectives, "hvd", OneRank)
    monkeypatch.setattr(layout_only, "hvd", OneRank)


def _model(seed=3):
    import keras
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, name="a"), keras.layers.Dense(3, name="b")])


def _trained(optimizer, steps=3, seed=3):
    model = _model(seed)
    model.compile(optimizer, "mse", jit_compile=False)
    rng = np.random.default_rng(seed)
    model.fit(rng.standard_normal((8 * steps, 6)).astype("float32"), rng.standard_normal((8 * steps, 3)),
              batch_size=8, verbose=0, shuffle=False)
    return model


def _state(model):
    from hvdtrain import backend
    return backend.optimizer_state(model.optimizer, model.trainable_variables)


@keras3
@pytest.mark.parametrize("accumulate", [1, 2])
def test_one_rank_sharded_trains_as_stage_0_and_its_state_bytes_are_its_range(alone, accumulate):
    import keras

    from hvdtrain import backend
    ours = _trained(backend.sharded_optimizer(keras.optimizers.Adam(0.01), stage=2,
                                              backward_passes_per_step=accumulate), steps=4)
    theirs = _trained(backend.distributed_optimizer(keras.optimizers.Adam(0.01),
                                                    backward_passes_per_step=accumulate), steps=4)
    for a, b in zip(ours.get_weights(), theirs.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert int(ours.optimizer.iterations.numpy()) == int(theirs.optimizer.iterations.numpy()) == 4 // accumulate
    psi = sum(int(np.prod(v.shape)) for v in ours.trainable_variables)
    # Adam: two float32 numbers per parameter; its learning rate (float32) and step counter (int64), and the
    # wrapper's counter
    held = backend.held_bytes(ours)
    assert held == {"weights_bytes": 4 * psi, "gradient_bytes": 4 * psi * (2 if accumulate > 1 else 1),
                    "optimizer_state_bytes": 8 * psi + 4 + 8 + 8}
    assert backend.held_bytes(theirs)["optimizer_state_bytes"] == 8 * psi + 4 + 8


@keras3
def test_a_checkpoints_optimizer_state_moves_between_stage_0_and_shards_bit_for_bit(alone, tmp_path):
    """Stage 0's state written as one shard, re-cut into three files, read back into sharded and whole optimizers:
    every slot and scalar as written."""
    import keras

    from hvdtrain import backend
    from hvdtrain.strategies import sharded
    source = _trained(backend.distributed_optimizer(keras.optimizers.Adam(0.01)))
    saved = _state(source)
    ckpt = tmp_path / "ckpt"
    sharded.write(source, ckpt, None, True, 0)
    header = json.loads((ckpt / "optimizer-0.json").read_text())
    assert header["range"] == [0, saved.total] and header["slots"] == ["momentum", "velocity"]
    whole = dict(np.load(ckpt / "optimizer-0.npz"))
    (ckpt / "optimizer-0.npz").unlink()
    (ckpt / "optimizer-0.json").unlink()
    for i, (lo, hi) in enumerate([(0, 11), (11, 40), (40, saved.total)]):   # three shards of another layout
        np.savez(ckpt / f"optimizer-{i}.npz", **{k: v[lo:hi] for k, v in whole.items()})
        (ckpt / f"optimizer-{i}.json").write_text(json.dumps({**header, "range": [lo, hi]}))
    meta = {"signature": {"optimizer_shards": 3}}
    for target in (backend.sharded_optimizer(keras.optimizers.Adam(0.01), stage=1),
                   backend.distributed_optimizer(keras.optimizers.Adam(0.01))):
        model = _model(seed=9)
        model.compile(target, "mse", jit_compile=False)
        backend.build_optimizer(model.optimizer, model.trainable_variables)
        sharded.restore(ckpt, meta, model, None)
        got = _state(model)
        assert got.scalars == saved.scalars and sorted(got.slots) == sorted(saved.slots)
        for slot in saved.slots:
            np.testing.assert_array_equal(got.slots[slot], saved.slots[slot])
        for a, b in zip(model.get_weights(), source.get_weights()):
            np.testing.assert_array_equal(a, b)
    (ckpt / "optimizer-1.npz").unlink()
    with pytest.raises(UserError, match=r"lacks part of the optimizer state \(optimizer-1.npz: "):
        sharded.restore(ckpt, meta, model, None)
    (ckpt / "optimizer-1.json").unlink()
    with pytest.raises(UserError, match=r"lacks part of the optimizer state \(no shard holds numbers 11..39 of "):
        sharded.restore(ckpt, meta, model, None)
