"""Tasks (classification, multilabel, regression) and models (keras.applications by name, local weights files,
builders by import path) in one process. The exact-evaluation sums are checked against Keras's own metrics, and a
multilabel model is trained with the task's loss and metrics."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import REPO
from hvdtrain import data, models, runtime
from hvdtrain.config import DataConfig, ModelConfig, RuntimeConfig
from hvdtrain.errors import UserError
from hvdtrain.tasks import Task
from hvdtrain.world import World


def keras_model(inputs: int, outputs: int, seed: int = 0):
    import keras
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((inputs,)), keras.layers.Dense(16, activation="relu"),
                             keras.layers.Dense(outputs)])


def task_data(kind: str, n: int = 203, outputs: int = 4):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, 6)).astype(np.float32)
    if kind == "classification":
        y = rng.integers(0, outputs, n)
    elif kind == "multilabel":
        y = (rng.random((n, outputs)) > 0.6).astype(np.float32)
    else:
        y = rng.standard_normal((n, outputs)).astype(np.float32)
    return x, y


@pytest.mark.parametrize("kind, top_k", [("classification", 2), ("multilabel", 0), ("regression", 0)])
def test_exact_sums_equal_keras_metrics_over_the_whole_set(kind, top_k):
    """Sums over uneven batches give the same numbers as Keras's own loss and metrics on the whole set at once."""
    import tensorflow as tf
    task = Task(kind, 4, top_k)
    x, y = task_data(kind)
    model = keras_model(6, 4)
    model.compile(loss=task.loss(), metrics=task.metrics())
    reference = model.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True)
    sums = sum(np.asarray(task.batch_sums(model(x[i:i + 37]), tf.constant(y[i:i + 37])))
               for i in range(0, len(x), 37))
    metrics = task.metrics_from_sums(sums)
    assert metrics["examples"] == len(x)
    assert metrics["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    headline = task.headline
    assert metrics[headline] == pytest.approx(reference[headline], rel=1e-6)
    if top_k:
        assert metrics["top2_accuracy"] == pytest.approx(reference["top2_accuracy"], rel=1e-6)
        assert metrics["top2_accuracy"] > metrics["accuracy"]


def test_multilabel_trains_with_the_tasks_loss_and_metrics_and_predicts_labels():
    """Synthetic multilabel data (a linear teacher, 4 independent labels) through the data source and the task."""
    import keras
    import tensorflow as tf
    cfg = DataConfig(source="synthetic", task="multilabel", input_shape=(6,), num_classes=4, synthetic_samples=2048)
    source = data.open_source(cfg)
    task = Task.from_config(cfg, top_k=5)
    assert task.top_k == 0 and task.label_shape == (4,) and task.headline == "accuracy"
    train = source.arrays("train")
    assert train.y.dtype == np.float32 and set(np.unique(train.y)) == {0.0, 1.0} and train.y.shape == (2048, 4)
    model = keras_model(6, 4)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=task.loss(), metrics=task.metrics())
    batches = source.train_batches(World(), 64, 32, 0, 10)
    model.fit(batches, epochs=10, steps_per_epoch=32, verbose=0)
    share = source.eval_share(World(), "test", 100)
    sums = sum(np.asarray(task.batch_sums(model(x), y)) for x, y in share.dataset)
    metrics = task.metrics_from_sums(sums)
    assert metrics["examples"] == 512 and metrics["accuracy"] > 0.9, metrics   # chance: about 0.5 per label
    x_test = source.arrays("test").x[:5]
    predicted = {k: v.numpy() for k, v in task.predictions(model(x_test)).items()}
    assert set(predicted) == {"labels", "probs"} == set(task.default_fields()) and task.output_fields() == ("labels", "probs")
    assert predicted["labels"].dtype == np.int64 and predicted["probs"].shape == (5, 4)
    assert np.array_equal(predicted["labels"], (predicted["probs"] > 0.5).astype(np.int64))
    assert np.allclose(predicted["probs"], tf.sigmoid(model(x_test)).numpy())


def test_prediction_fields_per_task():
    import tensorflow as tf
    scores = tf.constant([[1.0, 3.0, -1.0], [0.5, -2.0, 0.25]])
    cls = {k: v.numpy() for k, v in Task("classification", 3).predictions(scores).items()}
    assert list(cls["class"]) == [1, 0] and np.allclose(cls["probs"].sum(axis=1), 1.0)
    assert Task("classification", 3).output_fields() == ("class", "name", "probs")
    reg = Task("regression", 3).predictions(scores)
    assert set(reg) == {"value"} and np.array_equal(reg["value"].numpy(), scores.numpy())
    assert Task("regression", 3).default_fields() == ("value",) and Task("regression", 1).headline == "mae"


def test_labels_are_shaped_per_task():
    assert Task("classification", 3).labels(np.array([[2], [0]])).tolist() == [2, 0]
    assert Task("regression", 1).labels(np.array([1.5, 2.0])).shape == (2, 1)
    assert Task("multilabel", 2).labels(np.array([[1, 0]])).dtype == np.float32


# ------------------------------------------------------------------------------------------------ models
def test_applications_are_found_by_name_in_any_unambiguous_case():
    names = models.applications()
    assert {"ResNet50", "MobileNetV2", "EfficientNetB0"} <= set(names)
    model = models.build_model(ModelConfig(name="mobilenetv2", options={"alpha": 0.35}), (32, 32, 1), 4)
    assert model.name == "MobileNetV2" and model.output_shape == (None, 4) and model.input_shape == (None, 32, 32, 1)
    narrow = sum(int(np.prod(w.shape)) for w in model.weights)
    wide = sum(int(np.prod(w.shape)) for w in models.build_model(ModelConfig(name="MobileNetV2"), (32, 32, 1), 4).weights)
    assert narrow < wide / 3, "model.options reaches the architecture (alpha=0.35 is a much narrower network)"


def test_application_starts_from_a_local_weights_file_and_refuses_one_that_does_not_fit(tmp_path):
    import keras
    keras.utils.set_random_seed(3)
    body = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg",
                                          alpha=0.35)
    path = tmp_path / "mobilenet-notop.weights.h5"
    body.save_weights(str(path))
    keras.utils.set_random_seed(4)   # a different random start: only the file can make the weights equal
    model = models.build_model(ModelConfig(name="MobileNetV2", weights=str(path), options={"alpha": 0.35}),
                               (32, 32, 3), 5)
    loaded = model.get_weights()
    assert len(loaded) == len(body.get_weights()) + 2                                   # + the new head
    assert all(np.array_equal(a, b) for a, b in zip(loaded, body.get_weights()))
    with pytest.raises(UserError) as err:
        models.build_model(ModelConfig(name="MobileNetV2", weights=str(path)), (32, 32, 3), 5)   # alpha 1.0
    assert str(err.value).startswith(f"model.name=MobileNetV2 with inputs [32, 32, 3], weights {path}: ")
    assert "\n" not in str(err.value) and err.value.agreed


def test_application_options_that_do_not_exist_are_one_line():
    with pytest.raises(UserError, match=r"model.name=ResNet50 with inputs \[32, 32, 3\]: .*depth_multiplier"):
        models.build_model(ModelConfig(name="ResNet50", options={"depth_multiplier": 2}), (32, 32, 3), 3)


def test_a_builder_by_import_path_gets_shape_outputs_and_its_options(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "tests" / "fixtures"))
    model = models.build_model(ModelConfig(name="user_models:tiny_regressor", options={"units": 7}), (3, 2), 2)
    assert model.name == "tiny_regressor" and model.output_shape == (None, 2)
    assert [w.shape for w in model.weights][:2] == [(6, 7), (7,)]


@pytest.mark.parametrize("precision, compute", [("mixed_bfloat16", "bfloat16"), ("mixed_float16", "float16"),
                                                ("float32", "float32")])
def test_runtime_precision_sets_the_policy_and_outputs_stay_float32(precision, compute):
    import keras
    try:
        runtime.configure(RuntimeConfig(precision=precision), 1)
        assert keras.mixed_precision.global_policy().name == precision
        model = models.build_model(ModelConfig(name="ResNet50"), (32, 32, 3), 3)
        convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
        assert convs and all(layer.compute_dtype == compute and layer.variable_dtype == "float32" for layer in convs)
        assert model(np.zeros((1, 32, 32, 3), np.float32)).dtype.name == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_the_result_line_reads_right_for_one_rank_and_for_a_rerun_with_nothing_left_to_train():
    from hvdtrain.trainer import _result_line
    task = Task("classification", 10)
    tested = {"num_ranks": 1, "train_loss": 0.25, "samples_per_sec": 5832.0, "test_examples": 360,
              "test_accuracy": 0.97, "test_loss": 0.1}
    assert _result_line(tested, task) == \
        "test accuracy 0.9700  test loss 0.1000  (360 held-out examples, 1 rank, 5,832 samples/s)"
    rerun = {**tested, "num_ranks": 2, "train_loss": None, "samples_per_sec": 0}   # a finished run, run again
    assert _result_line(rerun, task) == \
        "test accuracy 0.9700  test loss 0.1000  (360 held-out examples, 2 ranks, nothing left to train)"
    no_test = {"test_examples": None}
    assert _result_line({**rerun, **no_test}, task) == "done: nothing left to train (2 ranks, no held-out split)"
    assert _result_line({**tested, **no_test}, task) == "done: train loss 0.2500 (1 rank, no held-out split)"
