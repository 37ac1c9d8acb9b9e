import json
import os
import stat

import numpy as np
import pytest

from conftest import KERAS_MAJOR
from hvdtrain import checkpoint
from hvdtrain.checkpoint import Checkpointer, Position
from hvdtrain.errors import UserError
from hvdtrain.rundir import RunDir, write_json


def model_and_optimizer(width=4, accumulate=None):
    import keras
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(width), keras.layers.Dense(2)])
    opt = keras.optimizers.SGD(0.1, momentum=0.9, **({"gradient_accumulation_steps": accumulate} if accumulate else {}))
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(np.ones((8, 3)), np.zeros(8), epochs=1, verbose=0)
    return model, opt


def saver(run, model, step_meta=None):
    return Checkpointer(run, {"signature": checkpoint.signature(model, (3,), 2, "m"), **(step_meta or {})}, keep=3)


def test_save_restore_round_trip_includes_optimizer_state(tmp_path):
    run = RunDir(tmp_path / "run").check()
    model, opt = model_and_optimizer()
    path = saver(run, model).save(model, Position(1, 0, 5), 1)
    other, other_opt = model_and_optimizer()
    other.fit(np.ones((8, 3)) * 3, np.ones(8), epochs=2, verbose=0)
    checkpoint.restore(path, other, other_opt)
    for a, b in zip(model.get_weights() + [v.numpy() for v in opt.variables],
                    other.get_weights() + [v.numpy() for v in other_opt.variables]):
        np.testing.assert_array_equal(a, b)
    assert int(other_opt.iterations.numpy()) == int(opt.iterations.numpy())
    assert checkpoint.read_meta(path)["global_step"] == 5 and checkpoint.read_meta(path)["num_ranks"] == 1


def test_latest_ignores_half_written_checkpoints_and_old_ones_are_pruned(tmp_path):
    run = RunDir(tmp_path / "run").check()
    model, _ = model_and_optimizer()
    keep2 = Checkpointer(run, {"signature": checkpoint.signature(model, (3,), 2, "m")}, keep=2)
    for step in (1, 2, 3, 4):
        keep2.save(model, Position(1, 0, step), 1)
    (run.checkpoints / ".tmp-crashed").mkdir()           # a writer killed mid-save
    (run.checkpoints / "ckpt-00000009").mkdir()          # renamed without meta.json: not complete
    assert [p.name for p in checkpoint.list_checkpoints(run.path)] == ["ckpt-00000003", "ckpt-00000004"]
    assert checkpoint.latest(run.path).name == "ckpt-00000004"


def test_checkpoint_of_another_model_names_the_first_differing_weight(tmp_path):
    run = RunDir(tmp_path / "run").check()
    model, _ = model_and_optimizer(width=4)
    path = saver(run, model).save(model, Position(0, 1, 1), 1)
    other, _ = model_and_optimizer(width=5)
    with pytest.raises(UserError) as err:
        checkpoint.check_compatible(path, checkpoint.read_meta(path), checkpoint.signature(other, (3,), 2, "m"))
    message = str(err.value)
    assert "belongs to another model (weight 0, " in message and "kernel: shape [3, 5] here, [3, 4] in the checkpoint" in message
    with pytest.raises(UserError, match="model is 'm', this run has 'x'"):
        checkpoint.check_compatible(path, checkpoint.read_meta(path), checkpoint.signature(model, (3,), 2, "x"))
    model.layers[0].trainable = False   # model.trainable_from: the optimizer's state would not fit
    with pytest.raises(UserError, match=r"was trained with other layers frozen \(0 frozen weights there, 2 here\)"):
        checkpoint.check_compatible(path, checkpoint.read_meta(path), checkpoint.signature(model, (3,), 2, "m"))


def test_accumulated_gradients_and_position_survive_a_checkpoint(tmp_path):
    """backward_passes_per_step on Keras 3: the local accumulators are optimizer variables, so a mid-accumulation stop
    resumes exactly. (Keras 2 optimizers have no accumulators; Horovod's helper keeps them outside the optimizer.)"""
    keras3 = KERAS_MAJOR >= 3
    run = RunDir(tmp_path / "run").check()
    model, opt = model_and_optimizer(accumulate=2 if keras3 else None)
    assert len(opt.variables) > 2 + 2 * keras3 * 4 - 1   # iterations, lr, momentum slots (+ 4 accumulators on Keras 3)
    path = saver(run, model).save(model, Position(0, 3, 3), 1)
    other, other_opt = model_and_optimizer(accumulate=2 if keras3 else None)
    checkpoint.restore(path, other, other_opt)
    for a, b in zip([v.numpy() for v in opt.variables], [v.numpy() for v in other_opt.variables]):
        np.testing.assert_array_equal(a, b)


def test_write_atomic_replaces_whole_file_with_the_umasks_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        target = tmp_path / "summary.json"
        write_json(target, {"a": 1})
        write_json(target, {"a": 2})
        assert json.loads(target.read_text()) == {"a": 2}
        assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
        assert stat.S_IMODE(target.stat().st_mode) == 0o644     # not mkstemp's 0600: colleagues can read it
        run = RunDir(tmp_path / "run").check()
        model, _ = model_and_optimizer()
        path = saver(run, model).save(model, Position(0, 1, 1), 1)
        assert stat.S_IMODE(path.stat().st_mode) == 0o755 and stat.S_IMODE(run.checkpoints.stat().st_mode) == 0o755
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in path.iterdir())
    finally:
        os.umask(old)


def test_unwritable_run_dir_is_a_clear_error_and_a_failed_start_leaves_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="is not writable .* --trainer.run_dir=PATH"):
        RunDir(blocker / "run").check()
    fresh = RunDir(tmp_path / "a" / "b" / "run").check()
    assert fresh.path.is_dir()
    fresh.discard_if_fresh()          # the start failed before anything was written
    assert not (tmp_path / "a").exists()
    used = RunDir(tmp_path / "used").check()
    (used / "config.yaml").write_text("x")
    used.discard_if_fresh()           # something was written: nothing is removed
    assert (used / "config.yaml").is_file()
