"""trainer.sync's strategies: which steps average gradients, after which steps local SGD averages the weights, where
the ranks may agree; checked against a step-by-step walk written independently of the closed forms. The settings'
bad values and combinations each stop with one line."""
import pytest

from hvdtrain.config import ConfigError, load_config
from hvdtrain.strategies.local_sgd import Periods


def step_by_step(plan: Periods, done: int) -> tuple[int, int]:
    """(gradient averages, weight averages) in the first `done` steps, walking the steps one by one."""
    gradients = weights = 0
    for step in range(done):
        completed = step + 1
        if step < plan.warmup_steps:
            gradients += 1
        elif (completed - plan.warmup_steps) % plan.period == 0 or completed % plan.steps_per_epoch == 0:
            weights += 1
    return gradients, weights


@pytest.mark.parametrize("period,warmup,steps_per_epoch", [(1, 0, 22), (8, 0, 22), (4, 22, 22), (16, 5, 7),
                                                            (3, 100, 10), (22, 0, 22), (5, 3, 1)])
def test_the_counts_match_a_step_by_step_walk(period, warmup, steps_per_epoch):
    plan = Periods(period, warmup, steps_per_epoch)
    for done in range(0, 5 * steps_per_epoch + 3):
        gradients = sum(plan.averages_gradients(step) for step in range(done))
        assert (gradients, plan.weight_averages(done)) == step_by_step(plan, done), done


def test_local_sgd_averages_the_weights_every_period_and_at_every_epoch_end_after_the_warmup():
    plan = Periods(period=8, warmup_steps=4, steps_per_epoch=22)
    assert [s for s in range(8) if plan.averages_gradients(s)] == [0, 1, 2, 3]
    averaged = [done for done in range(1, 45) if plan.averages_weights_after(done)]
    assert averaged == [12, 20, 22, 28, 36, 44]
    # The replicas are one model during the warm-up and right after each average, apart in between.
    apart = [done for done in range(1, 45) if not plan.one_model_after(done)]
    assert apart == [d for d in range(5, 45) if d not in averaged]


def test_the_strategy_and_its_plan_come_from_the_settings():
    from hvdtrain import strategies
    from hvdtrain.world import World
    cfg = load_config(None, ["--trainer.sync=local_sgd", "--trainer.sync_period=4", "--trainer.sync_warmup_steps=30",
                             "--trainer.sync_optimizer_state=average"])
    local = strategies.create(cfg, World())
    assert local.epoch_steps(lambda: 22) == 22 and local.periods == Periods(4, 30, 22)
    assert local.describe() == {"mode": "local_sgd", "period": 4, "warmup_steps": 30, "optimizer_state": "average",
                                "weight_averages_this_run": 0}
    assert load_config(None, ["--trainer.sync=local_sgd"]).trainer.sync_optimizer_state == "local"
    names = {extra: strategies.name_for(load_config(None, extra)) for extra in
             [(), ("--trainer.sync=fedavg",), ("--parallel.pipeline_stages=2",)]}
    assert list(names.values()) == ["every_step", "fedavg", "pipeline"]
    fedavg = load_config(None, ["--trainer.sync=fedavg", "--fedavg.clients=30", "--fedavg.fraction=0.2"])
    assert fedavg.fedavg.per_round == 6
    assert load_config(None, ["--trainer.sync=fedavg", "--fedavg.fraction=0.001"]).fedavg.per_round == 1


@pytest.mark.parametrize("overrides,message", [
    (["--trainer.sync=local_sgd", "--trainer.sync_period=0"],
     "trainer.sync_period must be >= 1 (steps between weight averages), got 0"),
    (["--trainer.sync=local_sgd", "--trainer.sync_warmup_steps=-1"], "trainer.sync_warmup_steps must be >= 0, got -1"),
    (["--trainer.sync_period=4"], "trainer.sync_period applies to trainer.sync=local_sgd only (this run's sync is "
                                  "every_step); set trainer.sync=local_sgd or leave trainer.sync_period out"),
    (["--trainer.sync=fedavg", "--trainer.sync_warmup_steps=5"], "trainer.sync_warmup_steps applies to "
     "trainer.sync=local_sgd only (this run's sync is fedavg)"),
    (["--trainer.sync=local_sgd", "--fedavg.local_epochs=5"], "fedavg.local_epochs applies to trainer.sync=fedavg "
     "only (this run's sync is local_sgd); set trainer.sync=fedavg or leave fedavg.local_epochs out"),
    (["--data.partition=labels:2"], "data.partition applies to trainer.sync=fedavg only"),
    (["--trainer.sync=fedavg", "--data.partition=labels:0"],
     "data.partition must be iid, labels:K (K >= 1) or dirichlet:ALPHA (ALPHA > 0), got 'labels:0'"),
    (["--trainer.sync=fedavg", "--data.partition=labels:11"], "data.partition=labels:11 asks for 11 labels per "
     "client but there are 10 classes (data.num_classes); use labels:K with K <= 10"),
    (["--trainer.sync=fedavg", "--fedavg.fraction=1.5"],
     "fedavg.fraction must be in (0, 1] (the share of clients sampled per round), got 1.5"),
    (["--trainer.sync=fedavg", "--fedavg.clients=0"], "fedavg.clients must be >= 1, got 0"),
    (["--trainer.sync=fedavg", "--runtime.precision=mixed_float16"], "trainer.sync=fedavg trains its clients in "
     "float32 or mixed_bfloat16"),
    (["--trainer.sync=fedavg", "--optim.warmup_epochs=1"], "trainer.sync=fedavg trains every client with optim.lr "
     "(optim.schedule=cosine decays it over the rounds); set optim.warmup_epochs=0 and optim.lr_scaling=none"),
    (["--trainer.sync=fedavg", "--data.source=synthetic", "--data.input_shape=[4]", "--data.task=regression",
      "--data.num_classes=1", "--data.partition=dirichlet:0.5"], "data.partition=dirichlet:0.5 splits the clients by "
     "class label; a regression task has none: use data.partition=iid"),
    (["--trainer.sync=fedavg", "--parallel.pipeline_stages=2"], "trainer.sync=fedavg averages whole models, not "
     "pipeline stages; set parallel.pipeline_stages=1"),
    (["--trainer.sync_optimizer_state=average"], "trainer.sync_optimizer_state applies to trainer.sync=local_sgd only"),
    (["--trainer.sync=local_sgd", "--parallel.pipeline_stages=2"],
     "trainer.sync=local_sgd averages whole models, not pipeline stages; use trainer.sync=every_step with "
     "parallel.pipeline_stages > 1"),
    (["--trainer.sync=local_sgd", "--trainer.elastic=true"], "trainer.sync=local_sgd cannot be elastic yet"),
    (["--trainer.sync=local_sgd", "--optim.backward_passes_per_step=2"],
     "trainer.sync=local_sgd already takes steps without communicating; set optim.backward_passes_per_step=1"),
    (["--trainer.sync=fedsgd"], "trainer.sync must be one of every_step | local_sgd | fedavg, got 'fedsgd'"),
])
def test_bad_sync_settings_stop_with_one_line(overrides, message):
    with pytest.raises(ConfigError) as raised:
        load_config(None, overrides)
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_the_keras_2_stack_refuses_local_sgd_with_one_line(monkeypatch):
    import tensorflow as tf
    import keras
    from hvdtrain import backend, runtime
    from hvdtrain.errors import UserError
    monkeypatch.setattr(runtime, "keras_major", lambda: 2)   # what TF 2.15's stack answers
    backend._keras_layer.cache_clear()
    try:
        with pytest.raises(UserError, match=r"^trainer.sync=local_sgd needs the Keras 3 stack \(TensorFlow >= 2.16\)"):
            backend.distributed_optimizer(keras.optimizers.SGD(0.1), switch=tf.Variable(True))
    finally:
        backend._keras_layer.cache_clear()
