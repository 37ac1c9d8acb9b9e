import json

import numpy as np
import pytest
import tensorflow as tf

from hvdtrain import checkpoint
from hvdtrain.errors import UserError


def model_and_optimizer(width=4):
    model = tf.keras.Sequential([tf.keras.layers.Dense(width, input_shape=(3,)), tf.keras.layers.Dense(2)])
    opt = tf.keras.optimizers.SGD(0.1, momentum=0.9)
    model.compile(opt, tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(np.ones((8, 3)), np.zeros(8), epochs=1, verbose=0)
    return model, opt


def meta(step, sig):
    return {"epoch": 1, "step_in_epoch": 0, "global_step": step, "signature": sig}


def test_save_restore_round_trip_includes_optimizer_state(tmp_path):
    run = checkpoint.prepare_run_dir(str(tmp_path / "run"))
    model, opt = model_and_optimizer()
    sig = checkpoint.signature(model, (3,), 2, "m")
    path = checkpoint.save(run, model, opt, meta(5, sig), keep=3)
    other, other_opt = model_and_optimizer()
    other.fit(np.ones((8, 3)) * 3, np.ones(8), epochs=2, verbose=0)
    checkpoint.restore(path, other, other_opt)
    for a, b in zip(model.get_weights() + [v.numpy() for v in opt.variables],
                    other.get_weights() + [v.numpy() for v in other_opt.variables]):
        np.testing.assert_array_equal(a, b)
    assert int(other_opt.iterations.numpy()) == int(opt.iterations.numpy())


def test_latest_ignores_half_written_checkpoints_and_old_ones_are_pruned(tmp_path):
    run = checkpoint.prepare_run_dir(str(tmp_path / "run"))
    model, opt = model_and_optimizer()
    sig = checkpoint.signature(model, (3,), 2, "m")
    for step in (1, 2, 3, 4):
        checkpoint.save(run, model, opt, meta(step, sig), keep=2)
    (run / "checkpoints" / ".tmp-crashed").mkdir()           # a writer killed mid-save
    (run / "checkpoints" / "ckpt-00000009").mkdir()          # renamed without meta.json: not complete
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["ckpt-00000003", "ckpt-00000004"]
    assert checkpoint.latest(run).name == "ckpt-00000004"


def test_checkpoint_of_another_model_is_refused(tmp_path):
    run = checkpoint.prepare_run_dir(str(tmp_path / "run"))
    model, opt = model_and_optimizer(width=4)
    path = checkpoint.save(run, model, opt, meta(1, checkpoint.signature(model, (3,), 2, "m")), keep=1)
    other, _ = model_and_optimizer(width=5)
    with pytest.raises(UserError, match="belongs to another model \\(weight shapes differ\\)"):
        checkpoint.check_compatible(path, checkpoint.read_meta(path), checkpoint.signature(other, (3,), 2, "m"))
    with pytest.raises(UserError, match="model is 'm', this run has 'x'"):
        checkpoint.check_compatible(path, checkpoint.read_meta(path), checkpoint.signature(model, (3,), 2, "x"))


def test_write_atomic_replaces_whole_file(tmp_path):
    target = tmp_path / "summary.json"
    checkpoint.write_json(target, {"a": 1})
    checkpoint.write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_unwritable_run_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="is not writable .* --trainer.run_dir=PATH"):
        checkpoint.prepare_run_dir(str(blocker / "run"))
