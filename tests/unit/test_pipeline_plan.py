"""Pipeline parallelism without ranks: the schedules (order, activations kept, the bubble by simulation), the layout
of ranks into stages and replicas, where a model may be cut, and the one-line errors of the parallel.* settings.
The pipeline itself runs in tests/parallel/test_pipeline.py."""
import pytest

from hvdtrain.config import ConfigError, check_world, load_config
from hvdtrain.pipeline.schedule import bubble, peak_alive, simulate, stage_ops
from hvdtrain.world import World

keras3 = pytest.mark.keras3   # the split reads Keras 3's functional graph; pipelines need the Keras 3 stack


# ---- schedules -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages,micro", [(2, 1), (2, 3), (3, 8), (4, 2), (4, 16)])
def test_every_stage_runs_each_forward_then_its_backward_once(schedule, stages, micro):
    for s in range(stages):
        ops = stage_ops(schedule, s, stages, micro)
        assert sorted(ops) == sorted([("F", m) for m in range(micro)] + [("B", m) for m in range(micro)])
        assert all(ops.index(("F", m)) < ops.index(("B", m)) for m in range(micro))
        assert [m for kind, m in ops if kind == "B"] == list(range(micro))   # backwards in micro-batch order


@pytest.mark.parametrize("stages,micro", [(2, 8), (4, 8), (4, 3)])
def test_1f1b_keeps_at_most_p_minus_s_micro_batches_and_gpipe_keeps_all(stages, micro):
    for s in range(stages):
        assert peak_alive(stage_ops("1f1b", s, stages, micro)) == min(stages - s, micro)
        assert peak_alive(stage_ops("gpipe", s, stages, micro)) == micro


def test_1f1b_warms_up_then_alternates_then_drains():
    assert stage_ops("1f1b", 0, 3, 4) == [("F", 0), ("F", 1), ("F", 2), ("B", 0), ("F", 3), ("B", 1), ("B", 2),
                                          ("B", 3)]
    assert stage_ops("1f1b", 2, 3, 4) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2), ("F", 3),
                                          ("B", 3)]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("micro", [1, 2, 4, 8, 16])
def test_simulated_idle_share_is_the_gpipe_bubble_and_nothing_deadlocks(schedule, stages, micro):
    result = simulate(schedule, stages, micro)
    assert result["idle"] == pytest.approx(bubble(stages, micro))
    assert result["makespan"] == pytest.approx(2 * (micro + stages - 1))


def test_a_schedule_that_runs_a_backward_before_its_forward_is_caught(monkeypatch):
    from hvdtrain.pipeline import schedule
    monkeypatch.setattr(schedule, "stage_ops", lambda *a: [("B", 0), ("F", 0)])
    with pytest.raises(ValueError, match="before its forward"):
        schedule.simulate("gpipe", 1, 1)


# ---- the layout of ranks ---------------------------------------------------------------------------------------------

def test_stages_are_neighbouring_ranks_and_replicas_read_one_shard_each():
    worlds = [World(rank=r, size=6, local_size=6, local_rank=r, stages=3) for r in range(6)]
    assert [(w.stage, w.replica) for w in worlds] == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    assert worlds[4].part_ranks() == [1, 4] and worlds[4].replica_group == (1, 4)
    assert (worlds[3].previous_rank, worlds[3].next_rank) == (None, 4)
    assert (worlds[5].previous_rank, worlds[5].next_rank) == (4, None)
    assert [(w.data_view().rank, w.data_view().size) for w in worlds] == [(0, 2)] * 3 + [(1, 2)] * 3
    plain = World(rank=1, size=2, local_size=2, local_rank=1)
    assert plain.data_view() is plain and plain.replica_group is None and plain.replicas == 2


# ---- settings --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,size,message", [
    (["--parallel.pipeline_stages=3"], 4, "parallel.pipeline_stages=3 does not divide the 4 ranks"),
    (["--parallel.pipeline_stages=4"], 2, "parallel.pipeline_stages=4: 4 stages need at least 4 ranks; 2 are running; "
                                          "launch with `scripts/launch.sh 4 hvdtrain ...`"),
    (["--parallel.pipeline_stages=2", "--parallel.microbatches=5"], 2,
     "parallel.microbatches=5 does not divide the replica batch of 64"),
    (["--parallel.pipeline_stages=2", "--trainer.global_batch_size=30"], 8,
     "trainer.global_batch_size=30 is not divisible by the 4 pipeline replicas"),
])
def test_layouts_that_do_not_fit_the_ranks_are_refused_with_one_line(overrides, size, message):
    with pytest.raises(ConfigError) as err:
        check_world(load_config(None, overrides), size)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides,message", [
    (["--parallel.schedule=zigzag"], "parallel.schedule must be one of 1f1b | gpipe, got 'zigzag'"),
    (["--parallel.pipeline_stages=0"], "parallel.pipeline_stages must be >= 1"),
    (["--parallel.microbatches=0"], "parallel.microbatches must be >= 1"),
    (["--parallel.pipeline_stages=3", "--parallel.split=[dense_1]"], "parallel.split names 1 layer(s) but"),
    (["--parallel.pipeline_stages=2", "--runtime.precision=mixed_float16"], "trains in float32 only"),
    (["--parallel.pipeline_stages=2", "--trainer.elastic=true"], "cannot be elastic"),
])
def test_bad_parallel_settings_are_refused_with_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_split_auto_is_the_empty_list_and_names_are_kept():
    assert load_config(None, ["--parallel.split=auto"]).parallel.split == ()
    assert load_config(None, ["--parallel.pipeline_stages=2", "--parallel.split=[dense_1]"]).parallel.split == ("dense_1",)


# ---- where a model may be cut ----------------------------------------------------------------------------------------

def _model(name, **kw):
    import keras
    from hvdtrain import models
    from hvdtrain.config import ModelConfig
    keras.backend.clear_session()   # layer names count from zero again (they are numbered per session)
    return models.build_model(ModelConfig(name=name, **kw), (8, 8, 1), 10)


@keras3
def test_the_mlp_is_balanced_by_parameters_and_its_stages_compose_to_the_model():
    import numpy as np
    from hvdtrain.pipeline import split
    model = _model("mlp")
    plan, stages = split.plan(model, 2)
    assert [plan.layers[s] for s in plan.starts] == ["flatten", "dense_1"]   # 16,640 | 34,186 beats 49,536 | 1,290
    assert plan.costs == (16640, 34186) and sum(plan.costs) == model.count_params()
    assert [len(s.trainable_weights) for s in stages] == [2, 4]
    x = np.random.default_rng(0).random((5, 8, 8, 1)).astype("float32")
    np.testing.assert_array_equal(stages[1](stages[0](x)), model(x))
    assert stages[1].get_layer("dense_1") is model.get_layer("dense_1")   # shared: one set of weights


@keras3
def test_a_residual_block_is_never_cut_and_named_cuts_are_checked():
    from hvdtrain.pipeline import split
    model = _model("resnet", blocks=1)
    graph = split.Graph(model)
    points = [graph.names[k] for k in graph.cut_points()]
    assert "re_lu_2" in points and "add" not in points and "conv2d_2" not in points   # inside block 1: two cross
    plan, stages = split.plan(model, 2, ("re_lu_2",))
    assert [plan.layers[s] for s in plan.starts] == ["conv2d", "re_lu_2"]


@keras3
@pytest.mark.parametrize("model_name,stages,names,message", [
    ("resnet", 2, ("add",), "a cut before 'add' crosses 2 tensors (from 'batch_normalization_2', 're_lu'); cut where "
                            "exactly one crosses, e.g. before"),
    ("mlp", 2, ("dense_9",), "model 'mlp' has no layer 'dense_9' (did you mean 'dense_2'?)"),
    ("mlp", 2, ("flatten",), "'flatten' is the model's first layer"),
    ("mlp", 3, ("dense_2", "dense"), "'dense' comes before 'dense_2' in the model"),
    ("mlp", 5, (), "parallel.pipeline_stages=5 needs 4 cuts but model 'mlp' has 3 places where exactly one tensor "
                   "crosses (before 'dense', before 'dense_1', before 'dense_2'); use at most 4 stages"),
    ("one-cut mlp", 3, (), "parallel.pipeline_stages=3 needs 2 cuts but model 'mlp' has 1 place where exactly one "
                           "tensor crosses (before 'dense'); use at most 2 stages"),
    ("one layer", 2, (), "parallel.pipeline_stages=2 needs 1 cut but model 'one_layer' has 0 places where exactly "
                         "one tensor crosses (none); it cannot be split: use parallel.pipeline_stages=1"),
])
def test_impossible_splits_are_refused_with_one_line(model_name, stages, names, message):
    import keras
    from hvdtrain.pipeline import split
    if model_name == "one layer":
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)], name="one_layer")
    elif model_name == "one-cut mlp":
        model = _model("mlp", hidden=())
    else:
        model = _model(model_name, **({"blocks": 1} if model_name == "resnet" else {}))
    with pytest.raises(ConfigError) as err:
        split.plan(model, stages, names)
    assert message in str(err.value) and "\n" not in str(err.value)


@keras3
def test_a_measured_split_follows_the_layers_costs():
    from hvdtrain.pipeline import split
    model = _model("mlp")
    costs = split.measured_costs(model, batch=8, repeats=1)
    assert len(costs) == 4 and all(c > 0 for c in costs)   # flatten, dense, dense_1, dense_2: ms each
    plan, _ = split.plan(model, 2, layer_costs=[1.0, 1.0, 1.0, 10.0])   # the head dominates: it gets a stage alone
    assert [plan.layers[s] for s in plan.starts] == ["flatten", "dense_2"] and plan.costs == (3.0, 10.0)
    assert "ms forward+backward" in plan.describe()


def test_the_keras_2_stack_refuses_pipeline_stages_with_one_line(monkeypatch):
    from hvdtrain import pipeline, runtime
    from hvdtrain.errors import UserError
    monkeypatch.setattr(runtime, "keras_major", lambda: 2)   # what TF 2.15's stack answers
    cfg = load_config(None, ["--parallel.pipeline_stages=2"])
    with pytest.raises(UserError, match=r"^parallel.pipeline_stages > 1 needs the Keras 3 stack \(TensorFlow >= 2.16\)"):
        pipeline.build(cfg.parallel, World(rank=0, size=2, local_size=2, stages=2), whole=None, objective=None,
                       log=None, global_batch=cfg.trainer.global_batch_size)


# ---- a stage that fails while serving --------------------------------------------------------------------------------

class _Loopback:
    """The transport replaced by queues (by peer and tag), so the serving protocol runs without ranks."""

    def __init__(self):
        import collections
        self.queues = collections.defaultdict(collections.deque)

    def send(self, array, dest, tag, kind="activations"):
        self.queues[dest, tag].append(array)

    send_object = send

    def recv(self, source, tag, tail, dtype, idle=True):
        return self.queues[source, tag].popleft().reshape((-1, *tail))

    def recv_object(self, source, tag):
        return self.queues[source, tag].popleft()

    def flush(self, keep=0):
        pass


def _served(stage: int):
    import numpy as np

    from hvdtrain.pipeline import split
    from hvdtrain.pipeline.stage import PipelineStage
    _, stages = split.plan(_model("mlp"), 3, ("dense", "dense_1"))
    world = World(rank=stage, size=3, local_size=3, stages=3)   # stage 1 reads; 2 receives from rank 0, sends to 2
    served = PipelineStage(stages[stage], world, _Loopback(), schedule="gpipe", microbatches=1)
    return served, np.zeros((4, *served.input_tail), "float32")


@keras3
def test_a_stage_that_cannot_read_ends_the_stream_for_the_next_after_what_it_sent():
    import numpy as np

    from hvdtrain.pipeline import serving
    from hvdtrain.pipeline.stage import EVAL_TAG, LABELS_TAG
    served, _ = _served(0)

    def batches():   # the second batch cannot be read
        yield np.zeros((4, 8, 8, 1), "float32"), np.arange(4)
        raise ValueError("unreadable input")
    with pytest.raises(ValueError, match="unreadable input"):
        list(serving.through(served, batches()))
    sent = served.channel.queues[1, EVAL_TAG]   # the batch the next stage can use, then the end of the stream
    assert [len(a) for a in sent] == [4, 0] and sent[0].shape[1:] == served.output_tail
    assert [list(y) for y in served.channel.queues[1, LABELS_TAG]] == [[0, 1, 2, 3]]   # labels travel along


@keras3
def test_a_stage_that_fails_receives_to_the_end_of_the_stream_and_ends_it_for_the_next():
    from hvdtrain.pipeline import serving
    from hvdtrain.pipeline.stage import EVAL_TAG, LABELS_TAG
    served, batch = _served(1)
    for _ in range(3):   # three batches from the previous stage, then the end of the stream
        served.channel.send(batch, 0, EVAL_TAG)
        served.channel.send(None, 0, LABELS_TAG)
    served.channel.send(batch[:0], 0, EVAL_TAG)

    def out_of_memory(x):
        raise MemoryError("no room for the batch")
    served._infer = out_of_memory   # this stage's own failure, e.g. a batch too large
    with pytest.raises(MemoryError):
        list(serving.through(served, None))
    assert not served.channel.queues[0, EVAL_TAG] and not served.channel.queues[0, LABELS_TAG]   # all received
    assert [len(a) for a in served.channel.queues[2, EVAL_TAG]] == [0]   # the next stage: only the end


# ---- building only the stage -----------------------------------------------------------------------------------------

@keras3
def test_a_rank_other_than_0_makes_only_its_stage_weights_with_the_unsplit_models_values():
    import keras
    import numpy as np

    from hvdtrain import models, pipeline
    from hvdtrain.config import ModelConfig
    from hvdtrain.pipeline import split

    def build():   # without clearing the session, which would end the stateless scope too
        keras.utils.set_random_seed(7)
        return models.build_model(ModelConfig(name="mlp"), (8, 8, 1), 10)
    keras.backend.clear_session()
    expected = {w.path: w.numpy() for w in build().weights}
    keras.backend.clear_session()   # the same layer names again
    whole = pipeline.build_whole(build, World(rank=1, size=2, local_size=2, stages=2))
    assert pipeline.held_parameters(whole) == 0   # nothing made yet
    _, stages = split.plan(whole, 2, ("dense_1",))
    pipeline.make_only(stages[1])
    assert pipeline.held_parameters(whole) == stages[1].count_params() < whole.count_params()
    assert all(np.array_equal(w.numpy(), expected[w.path]) for w in stages[1].weights)


@keras3
def test_weights_the_builder_sets_are_kept_for_the_stage_that_makes_them():
    import keras
    import numpy as np

    from hvdtrain import models, pipeline
    from hvdtrain.config import ModelConfig
    from hvdtrain.pipeline import split

    def pretrained():   # e.g. keras.applications with weights="imagenet"
        model = models.build_model(ModelConfig(name="mlp"), (8, 8, 1), 10)
        model.set_weights([np.full(w.shape, 0.5, "float32") for w in model.weights])
        return model
    keras.backend.clear_session()
    whole = pipeline.build_whole(pretrained, World(rank=1, size=2, local_size=2, stages=2))
    _, stages = split.plan(whole, 2, ("dense_1",))
    pipeline.make_only(stages[1])
    assert pipeline.held_parameters(whole) == stages[1].count_params()
    assert all(np.all(w.numpy() == 0.5) for w in stages[1].weights)
    assert not keras.src.backend.common.global_state.get_global_attribute("uninitialized_variables")
