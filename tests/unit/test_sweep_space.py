"""The sweep's search space, checked before any trial: what a good space becomes, and the one line each mistake
gets (`hvdtrain sweep` prints it; tests/integration/test_sweep.py checks that end to end for the command's own
checks and a few of these)."""
import pytest

from conftest import REPO
from hvdtrain.config import load_config
from hvdtrain.sweep.space import SpaceError, load_space, with_values

BASE = load_config(str(REPO / "configs/digits.yaml"))


def space_file(tmp_path, text: str):
    path = tmp_path / "space.yaml"
    path.write_text(text + "\n")
    return path


def test_a_space_becomes_ranges_an_objective_and_configs(tmp_path):
    space = load_space(space_file(tmp_path, "optim:\n  lr: {log_uniform: [1.0e-3, 1.0]}\n"
                                            "trainer.global_batch_size: {choice: [32, 64]}\n"
                                            "model.hidden: {choice: [[64], [128, 64]]}\n"
                                            "objective: {metric: test_loss}\nenqueue: [{optim.lr: 0.01}]"), BASE, 2)
    assert list(space.params) == ["optim.lr", "trainer.global_batch_size", "model.hidden"]   # file order
    lr = space.params["optim.lr"]
    assert (lr.kind, lr.low, lr.high, lr.describe()) == ("log_uniform", 1e-3, 1.0, "{log_uniform: [0.001, 1]}")
    assert lr.distribution().log and space.params["model.hidden"].choices == ([64], [128, 64])
    assert (space.objective.metric, space.objective.maximize) == ("test_loss", False)   # a loss is minimised
    assert space.enqueue == ({"optim.lr": 0.01},)
    cfg = with_values(BASE, {"optim.lr": 0.02, "trainer.global_batch_size": 32, "model.hidden": [128, 64]})
    assert (cfg.optim.lr, cfg.trainer.global_batch_size, tuple(cfg.model.hidden)) == (0.02, 32, (128, 64))
    assert cfg.trainer.epochs == BASE.trainer.epochs   # the rest is the base config's


@pytest.mark.parametrize("space, ranks, message", [
    ("optim.lrr: {log_uniform: [1.0e-3, 1.0]}", 1, "space.yaml: unknown config key 'optim.lrr' (did you mean 'lr'?)"),
    ("optimm.lr: {log_uniform: [1.0e-3, 1.0]}", 1,
     "space.yaml: unknown config section 'optimm' (did you mean 'optim'?)"),
    ("optim.lr: {log_uniform: [0, 1.0]}", 1, "space.yaml: optim.lr: log_uniform needs 0 < low < high, got [0, 1]"),
    ("optim.lr: {uniform: [0.5, 0.1]}", 1, "space.yaml: optim.lr: uniform needs low < high, got [0.5, 0.1]"),
    ("optim.lr: {loguniform: [1.0e-3, 1.0]}", 1,
     "space.yaml: optim.lr: unknown range kind 'loguniform' (did you mean 'log_uniform'?)"),
    ("optim.name: {choice: []}", 1, "space.yaml: optim.name: choice needs a non-empty list of values"),
    ("optim.name: {choice: [sgd, adamw]}", 1,
     "space.yaml: optim.name {choice: [\"sgd\", \"adamw\"]}: optim.name must be one of sgd | adam | rmsprop, got 'adamw'"),
    ("trainer.epochs: {uniform: [1, 5]}", 1,
     "space.yaml: trainer.epochs is an integer setting but uniform draws real numbers; use {int: [1, 5]} or a choice"),
    ("trainer.global_batch_size: {choice: [63, 100]}", 3,
     "space.yaml: trainer.global_batch_size {choice: [63, 100]} includes 100: trainer.global_batch_size=100 is not "
     "divisible by the 3 ranks; use a multiple of 3, e.g. 99 or 102"),
    ("trainer.global_batch_size: {int: [64, 96], step: 2}", 4,
     "includes 66: trainer.global_batch_size=66 is not divisible by the 4 ranks; use a multiple of 4, e.g. 64 or 68"),
    ("trainer.run_dir: {choice: [a, b]}", 1, "space.yaml: trainer.run_dir cannot be swept"),
    ("optim.lr: {log_uniform: [1.0e-3, 1.0]}\nobjective: {metric: test_acc}", 1,
     "space.yaml: objective metric 'test_acc' is not in a trial's summary.json (did you mean 'test_accuracy'?)"),
    ("optim.lr: {log_uniform: [1.0e-3, 1.0]}\nobjective: {direction: up}", 1,
     "space.yaml: objective direction must be maximize or minimize, got 'up'"),
    ("optim.lr: {log_uniform: [1.0e-3, 1.0]}\npruning: {metric: val_acc}", 1,
     "space.yaml: pruning metric 'val_acc' is not a column of metrics.csv (did you mean 'val_accuracy'?)"),
    ("optim.lr: {log_uniform: [1.0e-3, 1.0]}\nenqueue: [{optim.lr: 5.0}]", 1,
     "space.yaml: enqueue[0]: optim.lr=5.0 lies outside its range {log_uniform: [0.001, 1]}"),
    ("optim.lr: [1.0e-3, 1.0", 1, "space.yaml is not valid YAML at line 2, column 1: expected ',' or ']'"),
], ids=["unknown-key", "unknown-section", "log-zero", "low-above-high", "unknown-kind", "empty-choice", "bad-choice",
        "float-for-int", "batch-vs-ranks", "int-range-batch", "run-dir", "objective", "direction", "pruning-metric",
        "enqueue-outside", "yaml"])
def test_bad_space_is_refused_with_one_line(tmp_path, space, ranks, message):
    with pytest.raises(SpaceError) as err:
        load_space(space_file(tmp_path, space), BASE, ranks)
    text = str(err.value)
    assert message in text and "\n" not in text and err.value.exit_code == 2
