"""The Keras API with split layers for real: examples/keras_tensor.py, a plain Keras script, under horovodrun --mpi
-np 2 with T = 2 (one replica), all in one launch (tests/parallel/workers/keras_tensor_worker.py runs its phases).
Every step's logged loss and the whole model after an epoch match the same script run data-parallel (2 ranks, T = 1)
on the same global batches within 1e-5, with Adam and with SGD + momentum; model.keras is the whole model in plain
Keras; split again, it evaluates as training's exact evaluation did and predicts as the whole model does; a stop
mid-epoch resumes to the uninterrupted run's bits; misuses stop every rank with the CLI's one-line errors."""
import json

import numpy as np
import pytest

from conftest import REPO, horovodrun, output

pytestmark = pytest.mark.keras3   # split layers need the Keras 3 stack

WORKER = str(REPO / "tests/parallel/workers/keras_tensor_worker.py")


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("keras-tensor")
    (out / "stopped").mkdir()
    (out / "stopped" / "STOP").touch()   # seen at the first agreement step (10) by both ranks
    proc = horovodrun(2, ["python", WORKER, str(out)], "mpi", timeout=900)
    assert proc.returncode == 0, output(proc)[-5000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_every_step_and_the_whole_model_match_data_parallel_training(launched, optimizer):
    import keras
    out, (a, b) = launched
    assert (a["layout"], b["layout"]) == ([0, 1], [1, 1])   # tensor rank, replicas
    split, reference = a["runs"][f"tensor-{optimizer}"], a["runs"][f"dp-{optimizer}"]
    # a data-parallel rank logs the loss of its half of each global batch; T = 2's ranks the global batch's: the mean
    # of the halves' (both ranks of a tensor group log it)
    halves = zip(reference["losses"], b["runs"][f"dp-{optimizer}"]["losses"])
    assert split["losses"] == b["runs"][f"tensor-{optimizer}"]["losses"] and len(split["losses"]) == 22
    for mine, (first, second) in zip(split["losses"], halves):
        assert abs(mine - (first + second) / 2) <= 1e-5 * (first + second) / 2
    assert split["summary"]["weights_sha256"] == b["runs"][f"tensor-{optimizer}"]["summary"]["weights_sha256"]
    ours, theirs = (keras.saving.load_model(out / run / "model.keras") for run in (f"tensor-{optimizer}",
                                                                                 f"dp-{optimizer}"))
    largest = max(np.max(np.abs(w)) for w in theirs.get_weights())
    for w, mine, expected in zip(theirs.weights, ours.get_weights(), theirs.get_weights()):
        if "key/bias" not in w.path:   # no gradient: its values are rounding noise (see test_tensor.py)
            assert np.max(np.abs(mine - expected)) <= 1e-5 * largest, w.path
    parts = sorted(p.name for p in (out / f"tensor-{optimizer}" / "checkpoints" / "ckpt-00000022").iterdir())
    assert parts == ["meta.json", "tensor-0", "tensor-1"]


def test_the_whole_model_split_again_evaluates_and_predicts_as_in_training(launched):
    out, ranks = launched
    for rank in ranks:
        summary = rank["runs"]["tensor-adam"]["summary"]
        split, whole = rank["split"], rank["whole"]
        assert whole["parameters"] == summary["tensor"]["built_parameters"][0] - summary["tensor"]["split_parameters"][0]
        evaluated = split["evaluated"]   # the split model's exact metrics: what run.fit's evaluation computed
        assert (evaluated["loss"], evaluated["accuracy"], evaluated["examples"]) == \
            (summary["test_loss"], summary["test_accuracy"], 360)
        assert whole["evaluated"]["correct"] == summary["test_correct"]
        assert abs(whole["evaluated"]["loss"] - summary["test_loss"]) <= 1e-6 * summary["test_loss"]
        assert np.max(np.abs(np.array(split["predicted"]) - np.array(whole["predicted"]))) <= 1e-5
        assert np.array(split["predicted"]).shape == (360, 10)


def test_a_stop_mid_epoch_resumes_to_the_uninterrupted_runs_bits(launched):
    out, (a, _) = launched
    stopped, resumed = a["runs"]["stopped"]["summary"], a["runs"]["resumed"]["summary"]
    assert stopped["status"] == "stopped" and stopped["global_step"] == 10
    assert resumed["status"] == "completed"
    assert resumed["weights_sha256"] == a["runs"]["tensor-adam"]["summary"]["weights_sha256"]


MISUSES = {
    "whole model": "pass the model hvdtrain.keras.tensor_parallel returned, not the whole model",
    "optimizer": "must average over the replicas of its slice only: compile it with hvdtrain.keras.distribute("
                 "optimizer, world=world)",
    "unknown layer": "parallel.tensor_plan: model 'digits_transformer' has no layer 'mlp' (did you mean 'mlp_in'?)",
    "column without its row": "parallel.tensor_plan: column layer 'mlp_in' has no row partner",
}


def test_misuses_stop_every_rank_with_one_line(launched):
    for rank in launched[1]:
        assert set(rank["errors"]) == set(MISUSES)
        for case, message in MISUSES.items():
            assert message in rank["errors"][case] and "\n" not in rank["errors"][case], (case, rank["errors"][case])
