import numpy as np
import pytest
import tensorflow as tf

from hvdtrain import models
from hvdtrain.config import Config, ModelConfig, OptimConfig
from hvdtrain.errors import UserError
from hvdtrain.optim import build_optimizer, lr_schedule, scaled_lr


@pytest.mark.parametrize("name, shape", [("mlp", (8, 8, 1)), ("cnn", (8, 8, 1)), ("resnet", (16, 16, 3))])
def test_builtin_models_output_logits_per_class(name, shape):
    model = models.build_model(ModelConfig(name=name, width=8, blocks=1), shape, 7)
    out = model(np.zeros((3, *shape), np.float32))
    assert out.shape == (3, 7)


def test_users_can_register_their_own_builder():
    @models.register_model("tiny-test")
    def tiny(input_shape, num_classes, cfg):
        return tf.keras.Sequential([tf.keras.layers.Flatten(input_shape=input_shape),
                                    tf.keras.layers.Dense(num_classes * cfg.options["k"])])
    model = models.build_model(ModelConfig(name="tiny-test", options={"k": 2}), (4,), 3)
    assert model.output_shape == (None, 6)
    assert "tiny-test" in models.available()


def test_unknown_model_suggests_a_name():
    with pytest.raises(UserError, match="unknown model 'resnt' \\(did you mean 'resnet'\\?\\)"):
        models.build_model(ModelConfig(name="resnt"), (4,), 3)


def test_lr_scaling_rules():
    assert scaled_lr(0.1, "none", 4) == 0.1
    assert scaled_lr(0.1, "linear", 4) == pytest.approx(0.4)
    assert scaled_lr(0.1, "sqrt", 4) == pytest.approx(0.2)


def test_warmup_then_cosine_schedule_values():
    sched = lr_schedule(OptimConfig(lr=0.1, lr_scaling="linear", warmup_epochs=1, schedule="cosine"),
                        size=4, steps_per_epoch=10, epochs=5)
    values = [float(sched(s)) for s in (0, 5, 10, 30, 50)]
    assert values[0] == pytest.approx(0.1)          # warmup starts at the single-rank lr
    assert values[1] == pytest.approx(0.25)         # halfway to 0.4
    assert values[2] == pytest.approx(0.4)          # peak = lr * 4 ranks
    assert values[3] == pytest.approx(0.2, rel=1e-5)  # cosine halfway through the remaining 40 steps
    assert values[4] == pytest.approx(0.0, abs=1e-7)


def test_constant_schedule_without_warmup_and_serialisation():
    sched = lr_schedule(OptimConfig(lr=0.05), size=2, steps_per_epoch=10, epochs=2)
    assert [float(sched(s)) for s in (0, 19)] == pytest.approx([0.05, 0.05])
    assert type(sched).from_config(sched.get_config()).get_config() == sched.get_config()


@pytest.mark.parametrize("name", ["sgd", "adam", "rmsprop"])
def test_optimizers_from_config(name):
    opt = build_optimizer(Config().optim.__class__(name=name), 1, 10, 1)
    assert opt.__class__.__name__.lower() == name
