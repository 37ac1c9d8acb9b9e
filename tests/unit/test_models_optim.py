import numpy as np
import pytest

from conftest import KERAS_MAJOR, REPO
from hvdtrain import models
from hvdtrain.config import Config, DataConfig, ModelConfig, OptimConfig
from hvdtrain.errors import UserError
from hvdtrain.optim import build_optimizer, lr_schedule, scaled_lr
from hvdtrain.tasks import Task


@pytest.mark.parametrize("name, shape", [("mlp", (8, 8, 1)), ("cnn", (8, 8, 1)), ("resnet", (16, 16, 3)),
                                         ("MobileNetV2", (32, 32, 3)), ("ResNet50", (32, 32, 3))])
def test_models_output_raw_scores_per_class(name, shape):
    model = models.build_model(ModelConfig(name=name, width=8, blocks=1), shape, 7)
    out = model(np.zeros((3, *shape), np.float32))
    assert out.shape == (3, 7)
    assert model.name.lower().startswith(name.lower()[:6])


def test_users_can_register_their_own_builder_or_name_it_by_import_path(monkeypatch):
    import keras

    @models.register_model("tiny-test")
    def tiny(input_shape, num_classes, cfg):
        return keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(),
                                 keras.layers.Dense(num_classes * cfg.options["k"])])
    with pytest.raises(UserError, match="outputs 6 values per example but the data has 3 classes"):
        models.build_model(ModelConfig(name="tiny-test", options={"k": 2}), (4,), 3)
    assert models.build_model(ModelConfig(name="tiny-test", options={"k": 1}), (4,), 3).output_shape == (None, 3)
    assert "tiny-test" in models.available()
    monkeypatch.syspath_prepend(str(REPO / "tests" / "fixtures"))
    by_path = models.build_model(ModelConfig(name="user_models:tiny_regressor", options={"units": 5}), (4, 2), 2)
    assert by_path.name == "tiny_regressor" and by_path.output_shape == (None, 2)


@pytest.mark.parametrize("name, message", [
    ("resnt", "unknown model 'resnt' (did you mean 'resnet'?)"),
    ("ResNet5O", "did you mean 'ResNet50'?"),
    ("no_such_module:build", "cannot import module 'no_such_module'"),
    ("user_models:missing", "user_models has no function 'missing'"),
    ("user_models:not_a_model", "returned str, not a keras.Model"),
])
def test_unknown_or_broken_models_say_what_to_use(monkeypatch, name, message):
    monkeypatch.syspath_prepend(str(REPO / "tests" / "fixtures"))
    with pytest.raises(UserError) as err:
        models.build_model(ModelConfig(name=name), (32, 32, 3), 3)
    assert message in str(err.value) and err.value.agreed


def test_trainable_from_freezes_the_layers_before_it_and_trains_only_the_rest():
    """A plain Keras train step on the frozen model: the frozen weights keep their bits, the rest moves, and the
    gradients (what an optimizer receives, and so what is all-reduced) are the trainable part's only."""
    import keras
    keras.backend.clear_session()   # layer names count from zero again
    keras.utils.set_random_seed(1)
    model = models.build_model(ModelConfig(name="mlp", hidden=(16, 8), trainable_from="dense_1"), (4,), 3)
    assert [(layer.name, layer.trainable) for layer in model.layers] == [
        ("flatten", False), ("dense", False), ("dense_1", True), ("dense_2", True)]
    trained = [model.get_layer(name) for name in ("dense_1", "dense_2")]
    assert [id(w) for w in model.trainable_weights] == [id(w) for layer in trained for w in layer.weights]
    before = {layer.name: layer.get_weights() for layer in model.layers}
    model.compile(keras.optimizers.SGD(0.5), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(np.random.default_rng(0).normal(size=(32, 4)).astype("float32"), np.arange(32) % 3, epochs=2,
              verbose=0)
    changed = {layer.name: [not np.array_equal(w, b) for w, b in zip(layer.get_weights(), before[layer.name])]
               for layer in model.layers if layer.weights}
    assert changed == {"dense": [False, False], "dense_1": [True, True], "dense_2": [True, True]}


@pytest.mark.parametrize("layer, message", [
    ("dense_7", "model.trainable_from: model 'mlp' has no layer 'dense_7' (did you mean 'dense_2'?); its layers are "
                "flatten, dense, dense_1, dense_2"),
    ("flatten", None),   # the first layer: nothing frozen
])
def test_trainable_from_names_a_layer_of_the_model(layer, message):
    import keras
    keras.backend.clear_session()
    cfg = ModelConfig(name="mlp", hidden=(16, 8), trainable_from=layer)
    if message is None:
        assert all(layer.trainable for layer in models.build_model(cfg, (4,), 3).layers)
        return
    with pytest.raises(UserError) as err:
        models.build_model(cfg, (4,), 3)
    assert str(err.value) == message and err.value.agreed


def test_trainable_from_must_leave_weights_to_train():
    import keras

    @models.register_model("ends-in-softmax-test")
    def ends_in_softmax(input_shape, num_classes, cfg):
        return keras.Sequential([keras.Input(input_shape), keras.layers.Dense(num_classes),
                                 keras.layers.Activation("linear", name="scores")])
    with pytest.raises(UserError, match=r"^model.trainable_from=scores: no layer from there on has weights to train; "
                                        r"name an earlier layer$"):
        models.build_model(ModelConfig(name="ends-in-softmax-test", trainable_from="scores"), (4,), 3)


def test_application_refuses_too_small_inputs_with_one_line():
    with pytest.raises(UserError, match=r"model.name=ResNet50 with inputs \[8, 8, 3\]: "):
        models.build_model(ModelConfig(name="ResNet50"), (8, 8, 3), 3)


def test_mixed_precision_models_still_output_float32():
    import keras
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = models.build_model(ModelConfig(name="cnn", width=4), (8, 8, 1), 3)
        assert model(np.zeros((2, 8, 8, 1), np.float32)).dtype.name == "float32"
        assert any("bfloat16" in str(layer.compute_dtype) for layer in model.layers)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_task_sums_give_exact_metrics():
    import tensorflow as tf
    scores = tf.constant([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0], [1.0, 0.5, 0.0]])
    cls = Task("classification", 3, top_k=2)
    sums = np.asarray(cls.batch_sums(scores, tf.constant([0, 2, 1])))
    metrics = cls.metrics_from_sums(sums)
    assert metrics["accuracy"] == pytest.approx(1 / 3) and metrics["top2_accuracy"] == pytest.approx(1.0)
    reference = float(tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=[0, 2, 1], logits=scores)))
    assert metrics["loss"] == pytest.approx(reference, rel=1e-6)
    reg = Task("regression", 3)
    r = reg.metrics_from_sums(np.asarray(reg.batch_sums(scores, tf.zeros((3, 3)))))
    assert r["mae"] == pytest.approx(float(np.abs(scores.numpy()).mean())) and r["examples"] == 3
    multi = Task("multilabel", 3)
    m = multi.metrics_from_sums(np.asarray(multi.batch_sums(scores, tf.constant([[1, 0, 1], [0, 1, 1], [1, 1, 1]]))))
    assert m["accuracy"] == pytest.approx(8 / 9)   # logits > 0 predict 1; one of the nine labels is wrong


@pytest.mark.parametrize("task, y, message", [
    ("classification", np.array([[1, 2]]), "labels have shape [2] per example but classification needs one"),
    ("multilabel", np.array([[0, 2, 1]], np.float32), "multilabel target other than 0/1"),
    ("regression", np.array([[0.0, np.nan, 1.0]], np.float32), "non-finite label"),
    ("regression", np.zeros((2, 4), np.float32), "labels have 4 values per example but data.num_classes is 3"),
])
def test_labels_a_task_cannot_learn_from_are_refused(task, y, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Task(task, 3).check_labels(y, "f.npz")


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


def test_a_warmup_without_scaling_is_the_same_on_any_number_of_replicas():
    """lr_scaling=none: the same target on 1, 2 or 4 replicas, so the same warm-up, from lr/10 (nothing to warm
    from but a fixed share of it); with linear scaling on one replica, that same warm-up too."""
    def first_steps(scaling, size):
        sched = lr_schedule(OptimConfig(lr=0.05, lr_scaling=scaling, warmup_epochs=1), size=size,
                            steps_per_epoch=10, epochs=2)
        return [float(sched(s)) for s in (0, 5, 10)]
    one = first_steps("none", 1)
    assert one == pytest.approx([0.005, 0.0275, 0.05])
    assert first_steps("none", 2) == first_steps("none", 4) == one == first_steps("linear", 1)


def test_constant_schedule_without_warmup_and_serialisation():
    sched = lr_schedule(OptimConfig(lr=0.05), size=2, steps_per_epoch=10, epochs=2)
    assert [float(sched(s)) for s in (0, 19)] == pytest.approx([0.05, 0.05])
    assert type(sched).from_config(sched.get_config()).get_config() == sched.get_config()


@pytest.mark.parametrize("name", ["sgd", "adam", "rmsprop"])
def test_optimizers_from_config(name):
    opt = build_optimizer(Config().optim.__class__(name=name), 1, 10, 1)
    assert opt.__class__.__name__.lower() == name
    assert DataConfig().task == "classification"


def test_batch_norm_trains_with_the_fused_kernel_on_keras3_with_keras3s_results():
    """resnet and keras.applications models get TensorFlow's fused kernel on Keras 3 (Keras 2 already uses it); the
    outputs, gradients and moving statistics are Keras 3's own up to float rounding; the config stays plain."""
    import keras
    import tensorflow as tf
    keras3 = KERAS_MAJOR >= 3
    cfg = ModelConfig(name="resnet", width=4, blocks=1)
    model = models.build_model(cfg, (8, 8, 3), 3)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 5
    assert all(("call" in vars(layer)) == keras3 for layer in norms)   # switched per instance, only on Keras 3
    assert "BatchNormalization" in str(model.get_config()) and "fused" not in str(model.get_config()).lower()

    plain = type(model).from_config(model.get_config())   # as exported: Keras's own layers
    plain.set_weights(model.get_weights())
    assert not any("call" in vars(layer) for layer in plain.layers)
    x = np.random.default_rng(0).normal(1.0, 3.0, (6, 8, 8, 3)).astype(np.float32)
    results = []
    for m in (model, plain):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(m(x, training=True) ** 2)
        grads = tape.gradient(loss, m.trainable_variables)
        stats = [v.numpy() for layer in m.layers if isinstance(layer, keras.layers.BatchNormalization)
                 for v in (layer.moving_mean, layer.moving_variance)]
        results.append((float(loss), [g.numpy() for g in grads], stats, m(x, training=False).numpy()))
    (loss_f, grads_f, stats_f, infer_f), (loss_k, grads_k, stats_k, infer_k) = results
    assert loss_f == pytest.approx(loss_k, rel=1e-5)
    scale = max(np.abs(g).max() for g in grads_k)
    for a, b in zip(grads_f, grads_k):
        np.testing.assert_allclose(a, b, atol=1e-5 * scale)
    for a, b in zip(stats_f, stats_k):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(infer_f, infer_k, rtol=1e-4, atol=1e-4)
