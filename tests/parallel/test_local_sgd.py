"""Local SGD for real (trainer.sync=local_sgd), 2 ranks under horovodrun: each rank takes sync_period steps on its own,
then the weights are averaged. It trains digits to the guide's accuracy (docs/strategies.md) with at most a quarter of every-step
averaging's bytes (counted in summary.json and per epoch in metrics.csv, and recounted here from the model's size);
with plain SGD and a period of 1 it is every-step averaging up to rounding (the average of the updated weights is the
update with the averaged gradient; float32 rounds the two differently); the warm-up averages gradients exactly as every-step training does; a stop
resumes bit for bit, with the optimizer state kept local (each rank's own, checkpointed rank by rank) or averaged."""
import csv
import json
import os

import numpy as np
import pytest

from conftest import BIN, REPO, hvdtrain, horovodrun, output

pytestmark = pytest.mark.keras3   # the gradient switch is in hvdtrain's Keras 3 layer

HVDTRAIN = [str(BIN / "hvdtrain"), "train", "--config", str(REPO / "configs/digits.yaml"), "--trainer.progress=none"]
STEPS_PER_EPOCH = 22   # digits: 1,437 training images, global batch 64
LOCAL = ["--trainer.sync=local_sgd"]
# Where Keras 3's TensorFlow checkpoint keeps them (the weights under the optimizer, which tracks them first).
WEIGHTS, SLOTS = "optimizer/_trainable_variables/", "optimizer/_variables/"


def train(run, *extra, epochs: int = 2, launcher: str = "gloo", command=HVDTRAIN) -> dict:
    proc = horovodrun(2, [*command, f"--trainer.run_dir={run}", f"--trainer.epochs={epochs}", *extra], launcher)
    assert proc.returncode == 0, output(proc)[-4000:]
    return json.loads((run / "summary.json").read_text())


def recording(folder) -> list[str]:
    """The command of a run whose ranks record their weights after every step (tests/fixtures/user_models.py's
    recorded_mlp: the digits MLP) in `folder`."""
    folder.mkdir()
    path = os.pathsep.join(p for p in (str(REPO / "tests" / "fixtures"), os.environ.get("PYTHONPATH")) if p)
    return ["env", f"PYTHONPATH={path}", f"USER_MODELS_RECORD={folder}", *HVDTRAIN,
            "--model.name=user_models:recorded_mlp"]


def recorded(folder) -> list[list[str]]:
    """Per rank, the digest of its weights after each step."""
    return [(folder / f"rank{r}.txt").read_text().split() for r in range(2)]


def checkpoint_tensors(state_prefix, prefix: str) -> dict:
    import tensorflow as tf
    reader = tf.train.load_checkpoint(str(state_prefix))
    return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()
            if key.startswith(prefix) and key.endswith("VARIABLE_VALUE")}


def model_bytes(run) -> int:
    """The float32 bytes of the model's weights (the digits MLP has no others: gradients and weights alike)."""
    import keras
    model = keras.saving.load_model(run / "model.keras")
    assert not model.non_trainable_weights
    return 4 * model.count_params()


def test_local_sgd_reaches_the_readme_accuracy_with_a_quarter_of_the_bytes(tmp_path):
    every = train(tmp_path / "every", epochs=30, launcher="mpi")
    local = train(tmp_path / "local", *LOCAL, "--trainer.sync_period=8", epochs=30, launcher="mpi")
    assert local["status"] == "completed" and local["test_accuracy"] >= 0.95
    steps = 30 * STEPS_PER_EPOCH
    averages = sum(1 for done in range(1, steps + 1) if done % 8 == 0 or done % STEPS_PER_EPOCH == 0)
    assert local["sync"] == {"mode": "local_sgd", "period": 8, "warmup_steps": 0, "optimizer_state": "local",
                             "weight_averages_this_run": averages}   # the averages it made: the plan, carried out
    params = model_bytes(tmp_path / "local")
    assert every["communicated_bytes"] == steps * params
    assert local["communicated_bytes"] == averages * params <= every["communicated_bytes"] / 4
    with open(tmp_path / "local" / "metrics.csv") as f:
        per_epoch = [int(row["communicated_bytes"]) for row in csv.DictReader(f)]
    assert len(per_epoch) == 30 and sum(per_epoch) == local["communicated_bytes"]
    # Served from its checkpoint (each rank's part holds the same weights): the accuracy training reported.
    evaluated = hvdtrain(["evaluate", "--run", str(tmp_path / "local"), "--report", str(tmp_path / "eval.json")])
    assert evaluated.returncode == 0, output(evaluated)
    assert json.loads((tmp_path / "eval.json").read_text())["accuracy"] == local["test_accuracy"]


def test_a_period_of_one_with_plain_sgd_is_every_step_averaging(tmp_path):
    plain = ["--optim.momentum=0.0"]   # no optimizer state: the weights are all there is
    every = train(tmp_path / "every", *plain)
    local = train(tmp_path / "local", *plain, *LOCAL, "--trainer.sync_period=1")
    assert local["sync"]["weight_averages_this_run"] == 2 * STEPS_PER_EPOCH   # another computation...
    import keras
    ours = keras.saving.load_model(tmp_path / "local" / "model.keras").get_weights()
    theirs = keras.saving.load_model(tmp_path / "every" / "model.keras").get_weights()
    for mine, expected in zip(ours, theirs):   # ...of the same update, apart from 44 steps' float32 rounding
        assert np.max(np.abs(mine - expected)) <= 1e-4 * np.max(np.abs(expected))
    assert local["communicated_bytes"] == every["communicated_bytes"]   # one model-sized all-reduce per step either way


def test_the_warmup_averages_gradients_as_every_step_training_does_then_goes_local(tmp_path):
    """Each rank's weights after every step, as the ranks held them: through the warm-up (the first epoch) the ranks
    are one model and bit for bit every-step training's; after it they part at every local step and meet at every
    average (every 4 steps from the warm-up's end, and at the epoch's end), and the run goes its own way."""
    train(tmp_path / "every", command=recording(tmp_path / "every-steps"))
    local = train(tmp_path / "local", *LOCAL, "--trainer.sync_period=4", f"--trainer.sync_warmup_steps={STEPS_PER_EPOCH}",
                  command=recording(tmp_path / "local-steps"))
    every, mine = recorded(tmp_path / "every-steps"), recorded(tmp_path / "local-steps")
    assert [len(r) for r in every + mine] == [2 * STEPS_PER_EPOCH] * 4
    assert every[0] == every[1]                                       # every-step training: one model throughout
    averages = {26, 30, 34, 38, 42, 44}
    for step, (rank0, rank1, reference) in enumerate(zip(*mine, every[0]), start=1):
        assert (rank0 == rank1) == (step <= STEPS_PER_EPOCH or step in averages), f"step {step}"
        assert (rank0 == reference) == (step <= STEPS_PER_EPOCH), f"step {step}"
    assert local["test_accuracy"] >= 0.85
    params = model_bytes(tmp_path / "local")
    # Warm-up: 22 gradient averages; then weights at 26, 30, 34, 38, 42 and the epoch's end, 44.
    assert local["communicated_bytes"] == (STEPS_PER_EPOCH + 6) * params


@pytest.mark.parametrize("optimizer_state", ["local", "average"])
def test_a_stop_between_averages_waits_for_the_next_average_and_resumes_bit_for_bit(tmp_path, optimizer_state):
    settings = [*LOCAL, "--trainer.sync_period=8", f"--trainer.sync_optimizer_state={optimizer_state}"]
    uninterrupted = train(tmp_path / "whole", *settings)
    run = tmp_path / "stopped"
    run.mkdir()
    (run / "STOP").touch()   # seen after the first step; the ranks agree at the first average, step 8
    first = train(run, *settings)
    assert first["status"] == "stopped" and first["global_step"] == 8 and not (run / "STOP").exists()
    assert first["sync"]["weight_averages_this_run"] == 1
    parts = sorted(p.name for p in (run / "checkpoints" / "ckpt-00000008").iterdir())
    if optimizer_state == "local":   # one part per rank: the same weights, each rank's own momentum
        assert parts == ["meta.json", "rank-0", "rank-1"]
        rank0, rank1 = (checkpoint_tensors(run / "checkpoints/ckpt-00000008" / p / "state", "")
                        for p in ("rank-0", "rank-1"))
        model = [k for k in rank0 if k.startswith(WEIGHTS)]
        momenta = [k for k in rank0 if k.startswith(SLOTS) and rank0[k].ndim > 0]
        assert model and momenta
        assert all(np.array_equal(rank0[k], rank1[k]) for k in model)
        assert any(not np.array_equal(rank0[k], rank1[k]) for k in momenta)
    else:
        assert parts == ["meta.json", "state.data-00000-of-00001", "state.index"]   # one state: rank 0's
    resumed = train(run, *settings)
    assert resumed["status"] == "completed" and resumed["weights_sha256"] == uninterrupted["weights_sha256"]
    # Counted by each run as it sends: the stopped run's and the resumed run's bytes add up to the uninterrupted run's.
    assert first["communicated_bytes"] + resumed["communicated_bytes"] == uninterrupted["communicated_bytes"]
    assert resumed["sync"]["weight_averages_this_run"] == uninterrupted["sync"]["weight_averages_this_run"] - 1


def test_resuming_with_another_optimizer_state_layout_stops_with_one_line(tmp_path):
    run = tmp_path / "run"
    train(run, *LOCAL, epochs=1)
    proc = horovodrun(2, [*HVDTRAIN, f"--trainer.run_dir={run}", "--trainer.epochs=2", *LOCAL,
                          "--trainer.sync_optimizer_state=average"], "gloo")
    assert proc.returncode != 0
    errors = [line for line in output(proc).splitlines() if "hvdtrain: error:" in line]
    assert len(errors) == 1, output(proc)[-3000:]
    assert errors[0].endswith(f"checkpoint {run}/checkpoints/ckpt-00000022 holds each of 2 ranks' own optimizer "
                              "state (local SGD) and this run keeps one optimizer state; resume with the ranks and "
                              "trainer.sync_optimizer_state that wrote it, or use a fresh --trainer.run_dir")
