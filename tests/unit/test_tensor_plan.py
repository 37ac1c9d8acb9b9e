"""Which layers tensor parallelism splits (hvdtrain/tensor/plan.py) and its settings, in one process: the automatic
plan of the transformer and the MLP, every refusal of a user's plan in one line, the layout of the ranks, and the
whole model's weights sliced and put back together exactly (tensor/shard.py, no ranks needed)."""
import numpy as np
import pytest

from hvdtrain import config, models
from hvdtrain.config import ConfigError, ModelConfig
from hvdtrain.world import World

pytestmark = pytest.mark.keras3   # split layers subclass Keras 3's


@pytest.fixture(scope="module")
def transformer():
    return models.build_model(ModelConfig(name="transformer", width=64, heads=4), (8, 8, 1), 10)


def test_the_automatic_plan_splits_every_attention_by_heads_and_every_mlp_by_columns_then_rows(transformer):
    from hvdtrain.tensor import plan
    assert plan.automatic(transformer, 2) == {
        "block1_attention": "heads", "block1_mlp1": "column", "block1_mlp2": "row",
        "block2_attention": "heads", "block2_mlp1": "column", "block2_mlp2": "row"}
    assert plan.automatic(transformer, 8) == {"block1_mlp1": "column", "block1_mlp2": "row",   # 4 heads: not by 8
                                              "block2_mlp1": "column", "block2_mlp2": "row"}
    mlp = models.build_model(ModelConfig(), (8, 8, 1), 10)   # Flatten, 256, 128, 10: one pair, the head replicated
    flatten, hidden, hidden2, head = mlp.layers
    assert plan.automatic(mlp, 2) == {hidden.name: "column", hidden2.name: "row"}


@pytest.mark.parametrize("requested,tensor,message", [
    ({"block1_mlp2": "row"}, 2, "row layer 'block1_mlp2' has no column layer before it"),
    ({"block1_norm1": "row"}, 2, "'block1_norm1' is a LayerNormalization, and row splits a Dense"),
    ({"head": "column", "block1_mlp2": "row"}, 2, "column layer 'head' has no row partner (its output is the "
                                                   "model's output)"),
    ({"block1_mlp1": "column", "block1_mlp2": "row"}, 3, "layer 'block1_mlp1' has 128 output units, which "
                                                         "parallel.tensor_parallel=3 does not divide"),
    ({"block1_attention": "heads"}, 8, "layer 'block1_attention' has 4 heads, which parallel.tensor_parallel=8 "
                                       "does not divide"),
    ({"patch_embedding": "column", "block1_attention": "row"}, 2, "'patch_embedding' is a EinsumDense"),
])
def test_a_plan_the_model_cannot_follow_is_refused_in_one_line(transformer, requested, tensor, message):
    from hvdtrain.tensor import plan
    with pytest.raises(ConfigError) as raised:
        plan.checked(transformer, requested, tensor)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_model_with_nothing_to_split_is_refused():
    from hvdtrain.tensor import plan
    odd = models.build_model(ModelConfig(hidden=(255, 129)), (8, 8, 1), 10)
    with pytest.raises(ConfigError, match="model 'mlp' has no layer to split"):
        plan.automatic(odd, 2)


@pytest.mark.parametrize("overrides,size,message", [
    (["--parallel.tensor_parallel=2", "--parallel.tensor_plan={dense: columns}"], 2,
     "parallel.tensor_plan: dense: 'columns' must be one of column | row | heads | vocab (did you mean 'column'?)"),
    (["--parallel.tensor_plan={dense: column}"], 2, "parallel.tensor_plan applies to parallel.tensor_parallel > 1"),
    (["--parallel.tensor_parallel=2", "--trainer.sync=fedavg"], 2, "trainer.sync=fedavg averages whole models, not "
                                                                   "tensor-parallel slices"),
    (["--parallel.tensor_parallel=2", "--trainer.elastic=true"], 2, "parallel.tensor_parallel=2 cannot be elastic"),
    (["--parallel.tensor_parallel=2", "--parallel.shard_state=1"], 2, "parallel.shard_state=1 with "
                                                                      "parallel.tensor_parallel=2 is not supported yet"),
    (["--parallel.tensor_parallel=2"], 3, "parallel.tensor_parallel=2 does not divide the 3 ranks"),
    (["--parallel.tensor_parallel=4"], 2, "parallel.tensor_parallel=4: a tensor group of 4 ranks needs at least 4 "
                                          "ranks; 2 are running; launch with `scripts/launch.sh 4 hvdtrain ...`"),
    (["--parallel.tensor_parallel=2", "--parallel.pipeline_stages=2"], 2,
     "parallel.tensor_parallel=2 x parallel.pipeline_stages=2: 2 stages of 2 ranks need at least 4 ranks; 2 are running"),
    (["--parallel.tensor_parallel=2", "--parallel.pipeline_stages=2"], 6,
     "parallel.pipeline_stages=2 does not divide the 3 tensor groups (of parallel.tensor_parallel=2 ranks each)"),
    (["--parallel.tensor_parallel=2", "--trainer.global_batch_size=30"], 8,
     "trainer.global_batch_size=30 is not divisible by the 4 replicas (ranks / parallel.tensor_parallel)"),
])
def test_settings_and_layouts_are_refused_in_one_line(overrides, size, message):
    with pytest.raises(ConfigError) as raised:
        config.check_world(config.load_config(None, overrides), size)
    assert message in str(raised.value)


def test_tensor_ranks_are_innermost_then_stages_then_replicas():
    worlds = [World(rank=r, size=8, local_size=8, local_rank=r, stages=2, tensor=2) for r in range(8)]
    assert [(w.replica, w.stage, w.tensor_rank) for w in worlds] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    w = worlds[3]   # replica 0, stage 2, tensor slice 2
    assert (w.tensor_group, w.replica_group, w.previous_rank, w.next_rank) == ((2, 3), (3, 7), 1, None)
    assert w.reporters() == [2, 6]   # each replica's last stage, first tensor rank
    assert (w.data_view().rank, w.data_view().size) == (0, 2)
    assert sorted(map(tuple, w.process_groups())) == [(0, 1), (0, 4), (1, 5), (2, 3), (2, 6), (3, 7), (4, 5),
                                                      (6, 7)]   # each part's replicas, each tensor group
    two = World(rank=1, size=2, local_size=2, local_rank=1, tensor=2)   # D = 1, T = all: no process set needed
    assert two.process_groups() == [] and two.tensor_group == (0, 1) and two.replica_group == (1,)


def test_the_whole_models_weights_are_sliced_and_put_back_together_exactly(transformer):
    from hvdtrain.tensor.plan import automatic
    from hvdtrain.tensor.shard import merged, split_model
    plan = automatic(transformer, 2)
    splits = [split_model(transformer, plan, 2, t) for t in range(2)]
    for name in plan:
        whole = transformer.get_layer(name).get_weights()
        put_back = merged(splits[0].axes[name], [s.slices()[name] for s in splits])
        assert all(np.array_equal(a, b) for a, b in zip(whole, put_back)), name
    assert splits[0].axes["block1_mlp2"] == [0, None] and splits[0].axes["block1_mlp1"] == [1, 0]
    held, total = splits[0].parameters()
    in_split = sum(transformer.get_layer(name).count_params() for name in plan)
    biases = 2 * (64 + 64)   # held whole: the row layers' and the output projections' biases
    assert held == (in_split - biases) // 2 + biases and total == transformer.count_params() - in_split + held
