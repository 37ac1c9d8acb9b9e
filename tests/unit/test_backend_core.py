"""The distributed core in one process: hvdtrain's collectives, its Keras 3 layer and the loop's controller over a
fake Horovod that plays one rank (0 by default, or another) of two or more, the peers' contribution given by the test.
The fake applies what hvdtrain asks of Horovod (the compression, the process set, the root of a broadcast) and records
it. The real thing runs in tests/parallel; these pin the arithmetic (what is averaged, when, over which ranks, in what
precision, and before what) and the agreement rules where a failure is cheap to read."""
import numpy as np
import pytest

from conftest import KERAS_MAJOR
from hvdtrain.backend import collectives
from hvdtrain.errors import DataError, NonFiniteLoss, UserError

keras3 = pytest.mark.keras3   # hvdtrain's own layer exists on Keras 3 only (Keras 2 trains with Horovod's)


class ProcessSet:
    """A Horovod process set: the ranks in it."""

    def __init__(self, ranks):
        self.ranks = list(ranks)

    def __repr__(self):
        return f"ProcessSet({self.ranks})"


class _Cast:
    """Horovod's Compression.fp16: float tensors travel as float16 and come back in their own dtype."""

    @staticmethod
    def compress(tensor):
        import tensorflow as tf
        return (tf.cast(tensor, tf.float16), tensor.dtype) if tensor.dtype.is_floating else (tensor, None)

    @staticmethod
    def decompress(tensor, dtype):
        import tensorflow as tf
        return tensor if dtype is None else tf.cast(tensor, dtype)


class _NoCompression:
    @staticmethod
    def compress(tensor):
        return tensor, None

    @staticmethod
    def decompress(tensor, ctx):
        return tensor


class FakeHorovod:
    """horovod.tensorflow as rank `rank` of `size` sees it: every collective combines this rank's value with the
    peers' (`peer(value, name)`: what the others contribute, as one rank would; by default the same value) over the
    process set it is given, in what the compression sends, and is recorded: `calls` (kind, name or count) and
    `requests` (kind, name, op, compression, process set, the tensors' shapes, the dtypes that travel)."""
    Sum, Average, Min, Max = "sum", "average", "min", "max"

    class Compression:
        none, fp16 = _NoCompression, _Cast

    def __init__(self, size: int = 2, rank: int = 0, peer=lambda value, name: value):
        self._size, self._rank, self.peer, self.calls, self.requests = size, rank, peer, [], []

    @property
    def global_process_set(self):
        return ProcessSet(range(self._size))

    def size(self):
        return self._size

    def rank(self):
        return self._rank

    def _record(self, kind, name, op, compression, process_set, tensors):
        import tensorflow as tf
        assert self._rank in process_set.ranks, f"rank {self._rank} asked to take part in {process_set}"
        self.requests.append({"kind": kind, "name": name, "op": op, "compression": compression,
                              "process_set": process_set, "shapes": [tuple(t.shape) for t in tensors],
                              "sent": [(compression or _NoCompression).compress(tf.convert_to_tensor(t))[0].dtype.name
                                       for t in tensors]})

    def _reduce(self, x, op, name, compression, process_set):
        import tensorflow as tf
        x = tf.convert_to_tensor(x)
        sent, ctx = compression.compress(x)
        peer, _ = compression.compress(tf.cast(tf.convert_to_tensor(self.peer(x, name)), x.dtype))
        n = len(process_set.ranks)   # the peer's value stands for each of the n - 1 others
        total = {"sum": sent + (n - 1) * peer, "average": (sent + (n - 1) * peer) / n,
                 "min": tf.minimum(sent, peer), "max": tf.maximum(sent, peer)}[op]
        return compression.decompress(total, ctx)

    def allreduce(self, tensor, op="average", name=None, compression=_NoCompression, process_set=None):
        process_set = process_set or self.global_process_set
        self.calls.append(("allreduce", name))
        self._record("allreduce", name, op, compression, process_set, [tensor])
        return self._reduce(tensor, op, name, compression, process_set)

    def grouped_allreduce(self, tensors, op="average", compression=_NoCompression, name=None, process_set=None):
        process_set = process_set or self.global_process_set
        self.calls.append(("grouped_allreduce", len(tensors)))
        self._record("grouped_allreduce", name, op, compression, process_set, tensors)
        return [self._reduce(t, op, name, compression, process_set) for t in tensors]

    def allgather_object(self, obj, name=None):
        self.calls.append(("allgather_object", name))
        others = [self.peer(obj, name)] * (self._size - 1)
        return others[:self._rank] + [obj] + others[self._rank:]   # in rank order

    def broadcast(self, tensor, root_rank=0, name=None, process_set=None):
        process_set = process_set or self.global_process_set
        assert root_rank in process_set.ranks, f"root {root_rank} is not in {process_set}"
        self._record("broadcast", name, None, None, process_set, [tensor])
        self.requests[-1]["root"] = root_rank
        return tensor if root_rank == self._rank else self.peer(tensor, name)   # the root's value

    def broadcast_object(self, obj, root_rank=0, name=None):
        self.calls.append(("broadcast_object", name))
        return obj if root_rank == self._rank else self.peer(obj, name)

    def join(self):
        self.calls.append(("join", None))


@pytest.fixture
def fake(monkeypatch):
    """Install a FakeHorovod (configure it through the returned object) wherever the backend asks for Horovod."""
    h = FakeHorovod()
    monkeypatch.setattr(collectives, "hvd", lambda: h)
    monkeypatch.setattr(collectives, "_group_sets", {})   # a test may set up stages (see `stages`)
    if KERAS_MAJOR >= 3:
        from hvdtrain.backend import keras3 as layer
        monkeypatch.setattr(layer, "hvd", lambda: h)
    monkeypatch.delenv("HOROVOD_ELASTIC", raising=False)
    return h


@pytest.fixture
def stages(fake, monkeypatch):
    """A 2-stage pipeline on 4 ranks (stage = rank % 2): the process sets Horovod was started with."""
    fake._size = 4
    sets = [ProcessSet([0, 2]), ProcessSet([1, 3])]
    monkeypatch.setattr(collectives, "_group_sets", {tuple(s.ranks): s for s in sets})
    return sets


# ---- collectives: agreement, and one rank needing no round trip ----------------------------------------------------

def test_a_peers_error_stops_this_rank_too_with_its_type_and_rank(fake):
    fake.peer = lambda obj, name: DataError("shard 3 is corrupt")
    with pytest.raises(DataError, match=r"^shard 3 is corrupt \(on rank 1\)$") as err:
        collectives.agree_on_errors(lambda: "fine here", "t.agree")
    assert err.value.agreed and err.value.exit_code == DataError.exit_code
    from hvdtrain.sweep.space import SpaceError   # an error type whose constructor takes the message alone
    fake.peer = lambda obj, name: SpaceError("space.yaml: bad")
    with pytest.raises(SpaceError, match=r"^space.yaml: bad \(on rank 1\)$"):
        collectives.agree_on_errors(lambda: None, "t.agree")
    fake.peer = lambda obj, name: obj      # every rank failed the same way: no rank named
    with pytest.raises(NonFiniteLoss, match=r"^nan at step 4$"):
        collectives.agree_on_errors(lambda: (_ for _ in ()).throw(NonFiniteLoss("nan at step 4")), "t.agree")


def test_agreement_passes_results_through_when_every_rank_succeeds(fake):
    fake.peer = lambda obj, name: (None, 7) if name == "t.gather" else obj
    assert collectives.gather_agreed(lambda: 5, "t.gather") == [5, 7]
    assert collectives.agree_on_errors(lambda: "ok", "t.agree") == "ok"


def test_a_rank_leaving_with_an_error_joins_first_and_the_peer_follows_it(fake):
    with pytest.raises(DataError, match="^bad record$") as err:
        collectives.leave_with(DataError("bad record"), "t.leave")
    assert fake.calls[:2] == [("join", None), ("allgather_object", "t.leave")] and err.value.agreed
    fake.calls.clear()
    fake.peer = lambda obj, name: DataError("bad record")
    with pytest.raises(DataError, match=r"bad record \(on rank 1\)"):
        collectives.follow_leaver("t.leave")
    assert fake.calls[0] == ("join", None)


def test_one_rank_answers_at_once_without_horovod(fake):
    fake._size = 1
    fake.allreduce = fake.allgather_object = fake.broadcast_object = None   # any call would fail
    assert collectives.allreduce_sum([1.5, 2], "t").tolist() == [1.5, 2.0]
    assert collectives.allreduce_min([3], "t").tolist() == [3] and collectives.all_agree(False, "t") is False
    assert collectives.allgather_object({"a": 1}, "t") == [{"a": 1}] and collectives.broadcast_object(9, "t") == 9
    with pytest.raises(DataError, match="^alone$") as err:
        collectives.leave_with(DataError("alone"), "t")
    assert err.value.agreed


def test_sums_and_agreement_combine_the_peers_values(fake):
    fake.peer = lambda x, name: x * 0 + 10
    assert collectives.allreduce_sum([1.0, 2.0], "t").tolist() == [11.0, 12.0]
    fake.peer = lambda x, name: x * 0      # the peer says no
    assert collectives.all_agree(True, "t") is False


def test_a_rank_other_than_0_takes_rank_0s_variables(fake):
    import tensorflow as tf
    fake._rank = 1
    fake.peer = lambda x, name: x * 0 + 7.0                  # what rank 0 holds
    v = tf.Variable([1.0, 2.0])
    collectives.broadcast_variables([v], name="t.start")
    np.testing.assert_array_equal(v.numpy(), [7.0, 7.0])
    assert [(r["root"], r["process_set"].ranks) for r in fake.requests] == [(0, [0, 1])]


def test_a_stages_later_replica_takes_the_stages_first_replicas_variables(fake, stages):
    import tensorflow as tf
    fake._rank = 3                                           # stage 1, replica 1: its stage's first rank is 1
    fake.peer = lambda x, name: x * 0 + 7.0
    v = tf.Variable([1.0, 2.0])
    collectives.broadcast_variables([v], name="t.start", group=(1, 3))
    np.testing.assert_array_equal(v.numpy(), [7.0, 7.0])
    assert [(r["root"], r["process_set"]) for r in fake.requests] == [(1, stages[1])]
    fake.requests.clear()
    fake._rank = 1                                           # the root itself keeps its values
    collectives.broadcast_variables([v], name="t.start", group=(1, 3))
    assert [r["root"] for r in fake.requests] == [1]


def test_the_weight_averager_sets_every_variable_to_the_average_in_one_request(fake, stages):
    import tensorflow as tf
    fake._rank = 2                                           # stage 0, replica 1
    fake.peer = lambda x, name: x * 0 + 10.0
    a, b = tf.Variable([1.0, 2.0]), tf.Variable([[4.0]])
    over_all = collectives.variable_averager([a, b], "t.local_sgd")
    over_stage = collectives.variable_averager([a], "t.stage", group=(0, 2))
    assert fake.requests == []                               # made, not yet run: calling it is the collective
    over_all()                                               # (v + 3 * 10) / 4 over the 4 ranks
    np.testing.assert_array_equal(a.numpy(), [7.75, 8.0])
    np.testing.assert_array_equal(b.numpy(), [[8.5]])
    over_stage()                                             # (v + 10) / 2 over the stage's 2 replicas
    np.testing.assert_array_equal(a.numpy(), [8.875, 9.0])
    assert [(r["kind"], r["name"], r["op"], r["process_set"].ranks, r["shapes"]) for r in fake.requests] == [
        ("grouped_allreduce", "t.local_sgd", "average", [0, 1, 2, 3], [(2,), (1, 1)]),
        ("grouped_allreduce", "t.stage", "average", [0, 2], [(2,)])]


def test_only_horovod_errors_are_collective_failures():
    assert collectives.from_horovod(RuntimeError("HorovodAllreduce failed: Gloo connection closed"))
    assert not collectives.from_horovod(ValueError("shapes (3,) and (4,) are incompatible"))
    assert collectives.collective_failure(UserError("Horovod said no"), "epoch 1", "runs/x") is None


# ---- hvdtrain's Keras 3 layer --------------------------------------------------------------------------------------

def _step(optimizer, grads, start=(1.0, 2.0)):
    import keras
    var = keras.Variable(np.array(start, dtype="float32"))
    for g in grads:
        optimizer.apply([keras.ops.convert_to_tensor(np.array(g, dtype="float32"))], [var])
    return np.asarray(var)


@keras3
def test_the_update_uses_the_average_of_both_ranks_gradients(fake):
    import keras

    from hvdtrain import backend
    fake.peer = lambda g, name: 3 * g
    got = _step(backend.distributed_optimizer(keras.optimizers.SGD(1.0)), [[0.5, -1.0]])
    np.testing.assert_allclose(got, [1.0 - 1.0, 2.0 + 2.0])             # mean of g and 3g is 2g
    assert fake.calls == [("grouped_allreduce", 1)]
    fake.peer = lambda g, name: g                                        # a peer with our gradient: plain SGD exactly
    same = _step(backend.distributed_optimizer(keras.optimizers.SGD(0.1, momentum=0.9)), [[0.5, -1.0]] * 3)
    np.testing.assert_array_equal(same, _step(keras.optimizers.SGD(0.1, momentum=0.9), [[0.5, -1.0]] * 3))


@keras3
def test_clipping_sees_the_averaged_gradient(fake):
    import keras

    from hvdtrain import backend
    fake.peer = lambda g, name: g * 0                  # average of (6, 8) and (0, 0) is (3, 4), norm 5
    got = _step(backend.distributed_optimizer(keras.optimizers.SGD(1.0, clipnorm=1.0)), [[6.0, 8.0]], start=(0, 0))
    np.testing.assert_allclose(got, [-0.6, -0.8], rtol=1e-6)   # clipped before averaging it would be (-0.3, -0.4)


@keras3
def test_fp16_compression_sends_float16_and_the_update_gets_what_arrived(fake):
    import keras

    from hvdtrain import backend
    g = 1.0 + 2.0 ** -12                                  # a float32 value float16 rounds to 1.0
    compressed = _step(backend.distributed_optimizer(keras.optimizers.SGD(1.0), fp16_compression=True), [[g, -g]],
                       start=(0, 0))
    np.testing.assert_array_equal(compressed, [-1.0, 1.0])
    plain = _step(backend.distributed_optimizer(keras.optimizers.SGD(1.0)), [[g, -g]], start=(0, 0))
    np.testing.assert_array_equal(plain, np.float32([-g, g]))
    assert [r["sent"] for r in fake.requests] == [["float16"], ["float32"]]   # what reached Horovod


@keras3
def test_a_pipeline_stage_averages_over_its_own_replicas_only(fake, stages):
    import keras

    from hvdtrain import backend
    fake._rank, fake.peer = 3, lambda g, name: 3 * g      # stage 1's other replica (rank 1) has 3g
    got = _step(backend.distributed_optimizer(keras.optimizers.SGD(1.0), group=(1, 3)), [[0.5, -1.0]])
    np.testing.assert_allclose(got, [1.0 - 1.0, 2.0 + 2.0])   # mean over 2 replicas; over all 4 ranks it would be 2.5g
    assert [r["process_set"] for r in fake.requests] == [stages[1]]


@keras3
def test_frozen_layers_send_nothing_only_the_trainable_parts_gradients_are_averaged(fake):
    import keras

    from hvdtrain import backend, models
    from hvdtrain.config import ModelConfig
    keras.backend.clear_session()   # layer names count from zero again
    keras.utils.set_random_seed(1)
    model = models.build_model(ModelConfig(name="mlp", hidden=(16,), trainable_from="dense_1"), (4,), 3)
    model.compile(optimizer=backend.distributed_optimizer(keras.optimizers.SGD(0.1)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
    x, y = np.random.default_rng(0).normal(size=(16, 4)).astype("float32"), np.arange(16) % 3
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    # The compiled step asks once, when it is traced: dense_1's kernel and bias, not dense's.
    assert [sorted(r["shapes"]) for r in fake.requests] == [[(3,), (16, 3)]]


@keras3
def test_accumulated_steps_communicate_once_per_optimizer_step(fake):
    import keras

    from hvdtrain import backend
    opt = backend.distributed_optimizer(keras.optimizers.SGD(1.0), backward_passes_per_step=2)
    once = _step(opt, [[1.0, 1.0]])
    np.testing.assert_array_equal(once, [1.0, 2.0])           # accumulating: no update, and no all-reduce
    assert fake.calls == []
    got = _step(backend.distributed_optimizer(keras.optimizers.SGD(1.0), backward_passes_per_step=2),
                [[1.0, 1.0], [3.0, 3.0]])
    plain = _step(keras.optimizers.SGD(1.0, gradient_accumulation_steps=2), [[1.0, 1.0], [3.0, 3.0]])
    np.testing.assert_array_equal(got, plain)                # the peer's gradients equal ours: the local result
    assert fake.calls == [("grouped_allreduce", 1)]
    with pytest.raises(UserError, match="set that or backward_passes_per_step, not both"):
        backend.distributed_optimizer(keras.optimizers.SGD(1.0, gradient_accumulation_steps=2),
                                      backward_passes_per_step=2)


@keras3
def test_loss_scaling_skips_the_step_every_rank_skips(fake):
    import keras

    from hvdtrain import backend
    fake.peer = lambda x, name: x * 0 if name == "hvdtrain.loss_scale.finite" else x   # the peer's grads overflowed
    opt = backend.loss_scale(backend.distributed_optimizer(keras.optimizers.SGD(1.0)))
    scale = opt.initial_scale
    got = _step(opt, [[1.0, 1.0]])
    np.testing.assert_array_equal(got, [1.0, 2.0])                    # finite here, skipped as on the peer
    assert float(opt.dynamic_scale) == scale / 2 and ("allreduce", "hvdtrain.loss_scale.finite") in fake.calls
    assert ("grouped_allreduce", 1) not in fake.calls                 # no gradient all-reduce for a skipped step
    assert backend.is_distributed(opt) and not backend.is_distributed(keras.optimizers.SGD(1.0))


@keras3
def test_buckets_fill_in_backward_order_up_to_their_size():
    from hvdtrain.backend.keras3 import buckets
    assert buckets([4, 4, 4], 0) == [[2, 1, 0]]                    # one group, the last layer's gradient first
    assert buckets([4, 4, 4, 4], 8) == [[3, 2], [1, 0]]
    assert buckets([4, 20, 4, 4], 8) == [[3, 2], [1], [0]]          # a big gradient fills a bucket alone
    assert buckets([4, 4, 4], 100) == [[2, 1, 0]] and buckets([], 8) == []


@keras3
def test_bucketed_averaging_gives_the_same_update_in_more_all_reduces(fake):
    import keras

    from hvdtrain import backend

    def train(bucket_mb):
        keras.utils.set_random_seed(3)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(32), keras.layers.Dense(4)])
        opt = backend.distributed_optimizer(keras.optimizers.SGD(0.1), bucket_mb=bucket_mb)
        grads = [keras.ops.ones(v.shape) * (i + 1) for i, v in enumerate(model.trainable_variables)]
        opt.apply(grads, model.trainable_variables)
        return [np.asarray(v) for v in model.trainable_variables]

    fake.peer = lambda g, name: 3 * g
    whole = train(0)
    assert fake.calls == [("grouped_allreduce", 4)]
    fake.calls.clear()
    split = train(128 / 2**20)   # 128-byte buckets: the last bias and kernel, then the first bias, then its kernel
    assert fake.calls == [("grouped_allreduce", 2), ("grouped_allreduce", 1), ("grouped_allreduce", 1)]
    fake.calls.clear()
    train(1e-9)                  # less than a byte: one request per tensor, never one group
    assert fake.calls == [("grouped_allreduce", 1)] * 4
    for a, b in zip(whole, split):
        np.testing.assert_array_equal(a, b)


# ---- the controller: the agreed stop, as rank 0 of two sees it -----------------------------------------------------

def _session_fit(tmp_path, fake, steps=8, every=3, **options):
    """Fit a small model for one epoch of `steps` steps through a real Session (the fake's rank of two, the peer
    faked)."""
    import keras

    from hvdtrain import backend
    from hvdtrain.loop.progress import Options
    from hvdtrain.loop.stop import StopRequest
    from hvdtrain.rundir import RunDir
    from hvdtrain.session import Session
    from hvdtrain.strategies import DataParallel
    from hvdtrain.world import World
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer=backend.distributed_optimizer(keras.optimizers.SGD(0.1)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
    world = World(rank=fake.rank(), size=2, local_rank=fake.rank(), local_size=2, controller="gloo")
    session = Session(world, RunDir(tmp_path / "run").check(), DataParallel(world), steps_per_epoch=steps, epochs=1,
                      global_batch=8, options=Options(check_every_steps=every, tensorboard=False, progress="none",
                                                      **options), stop=StopRequest(), meta={})
    x, y = np.random.default_rng(0).normal(size=(4 * steps, 4)).astype("float32"), np.arange(4 * steps) % 3

    def batches_from(first_epoch, epochs, skip):
        import tensorflow as tf
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(4).skip(skip)
    session.strategy.train(session, model, batches_from)
    return session


def _peer_flags(stop=0.0, bad=0.0, peer_rank=1):
    """The peer's share of the agreement vector [rank 0 bad, rank 1 bad, stop requested, present]."""
    def peer(value, name):
        if name == "hvdtrain.agreed_stop":
            flags = np.array([0.0, 0.0, stop, 1.0])
            flags[peer_rank] = bad
            return flags
        return "SIGUSR1" if name == "hvdtrain.stop_reason" else value
    return peer


@keras3
def test_a_peers_stop_request_stops_this_rank_at_the_next_agreement_step_with_a_checkpoint(tmp_path, fake):
    fake.peer = _peer_flags(stop=1.0)
    session = _session_fit(tmp_path, fake, steps=8, every=3)
    p = session.progress
    assert (p.stop_reason, p.position.global_step, p.requested_by) == ("stop_requested", 3, "SIGUSR1 on rank 1")
    assert session.status == "stopped"
    assert sorted(c.name for c in (tmp_path / "run/checkpoints").glob("ckpt-*")) == ["ckpt-00000003"]
    assert p.history and p.history[-1]["partial"] == 1 and p.history[-1]["global_step"] == 3


@keras3
def test_rank_1_stops_where_rank_0_asked_and_leaves_the_checkpoint_to_it(tmp_path, fake):
    fake._rank, fake.peer = 1, _peer_flags(stop=1.0, peer_rank=0)
    session = _session_fit(tmp_path, fake, steps=8, every=3)
    p = session.progress
    assert (p.stop_reason, p.position.global_step, p.requested_by) == ("stop_requested", 3, "SIGUSR1 on rank 0")
    assert session.status == "stopped" and not list((tmp_path / "run").rglob("ckpt-*"))   # rank 0 writes them
    broadcasts = [r for r in fake.requests if r["kind"] == "broadcast"]      # the start: rank 0's state, taken
    assert broadcasts and {r["root"] for r in broadcasts} == {0}


@keras3
def test_a_peers_non_finite_weights_stop_every_rank_and_nothing_bad_is_saved(tmp_path, fake):
    fake.peer = _peer_flags(bad=1.0)
    session = _session_fit(tmp_path, fake, steps=8, every=3)
    p = session.progress
    assert (p.stop_reason, p.position.global_step) == ("nonfinite", 3) and "on rank(s) 1" in p.failure
    assert not list((tmp_path / "run/checkpoints").glob("ckpt-*")) and session.status == "failed"


@keras3
def test_without_requests_the_epoch_runs_to_the_end_with_its_checkpoint_and_averaged_metrics(tmp_path, fake):
    fake.peer = lambda value, name: value * 0 + 1000.0 if name == "hvdtrain.metric_average" else \
        _peer_flags()(value, name)                      # the peer's epoch metrics all read 1000
    session = _session_fit(tmp_path, fake, steps=8, every=3)
    p = session.progress
    assert (p.stop_reason, p.position.global_step, session.status) == ("", 8, "completed")
    assert [c.name for c in (tmp_path / "run/checkpoints").glob("ckpt-*")] == ["ckpt-00000008"]
    last = p.history[-1]
    assert 500 < last["loss"] < 502                       # (ours + 1000) / 2: averaged over the two ranks
    assert last["global_step"] == 8 and last["partial"] == 0   # the controller's own numbers, after the averaging


@keras3
def test_step_checkpoints_fall_on_agreement_steps_only(tmp_path, fake):
    """checkpoint_every_steps=4 with agreements every 3 steps of an 8-step epoch: steps 3, 6 and 8 are agreed, so the
    checkpoints are at 6 (the first agreed step 4 or more after the start) and 8 (the end), never at an unchecked 4."""
    fake.peer = _peer_flags()
    _session_fit(tmp_path, fake, steps=8, every=3, checkpoint_every_steps=4, keep_checkpoints=5)
    assert sorted(c.name for c in (tmp_path / "run/checkpoints").glob("ckpt-*")) == ["ckpt-00000006", "ckpt-00000008"]
