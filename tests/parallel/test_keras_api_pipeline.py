"""The Keras API with pipeline stages for real: examples/keras_pipeline.py, a plain Keras script, under horovodrun
--mpi -np 2 as one 2-stage pipeline (D=1), all in one launch (tests/parallel/workers/keras_pipeline_worker.py runs
its phases). Its whole model after 2 epochs matches
the same script run data-parallel (2 ranks, no stages) on the same global batches within float32 rounding; model.keras
is the whole model in plain Keras; the val metrics of run.fit are the whole model's exact metrics; a stop mid-epoch
resumes to the uninterrupted run's bits; misuses stop every rank with the CLI's one-line errors. A Gloo launch is
refused as the CLI refuses it."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, env, horovodrun, output

pytestmark = pytest.mark.keras3   # the pipeline needs the Keras 3 stack

WORKER = str(REPO / "tests/parallel/workers/keras_pipeline_worker.py")
STEPS = 2 * 22   # 2 epochs of 1,437 digits in global batches of 64


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("keras-pipeline")
    (out / "stopped").mkdir()
    (out / "stopped" / "STOP").touch()   # seen at the first agreement step (10), by both stages
    proc = horovodrun(2, ["python", WORKER, str(out)], "mpi", timeout=600)
    assert proc.returncode == 0, output(proc)[-5000:]
    (out / "output.txt").write_text(output(proc))
    return out


def ranks(out) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


PLAIN_KERAS = """
import sys, numpy as np, keras
assert "hvdtrain" not in sys.modules and "horovod" not in sys.modules
for i, path in enumerate(sys.argv[2:]):
    np.savez(f"{sys.argv[1]}-{i}.npz", *keras.saving.load_model(path).get_weights())
"""


def plain_keras_weights(tmp_path, *models) -> list:
    proc = subprocess.run([sys.executable, "-c", PLAIN_KERAS, str(tmp_path / "weights"), *map(str, models)],
                          env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [np.load(tmp_path / f"weights-{i}.npz") for i in range(len(models))]
    return [[f[f"arr_{k}"] for k in range(len(f.files))] for f in files]


def test_a_pipeline_trains_as_data_parallel_training_and_exports_the_whole_model(launched, tmp_path):
    a, b = ranks(launched)
    assert (a["layout"], b["layout"]) == ([0, 1], [1, 1])   # stage, replicas
    pipelined, reference = a["summaries"]["pipeline"], a["summaries"]["dp"]
    assert pipelined["weights_sha256"] == b["summaries"]["pipeline"]["weights_sha256"]   # every rank's summary
    for summary in (pipelined, reference):
        assert summary["status"] == "completed" and summary["global_step"] == summary["optimizer_steps"] == STEPS
    idle = pipelined["pipeline"].pop("idle_share")   # measured, as `hvdtrain train` measures it
    assert len(idle) == 2 and all(0.0 < share < 1.0 for share in idle), idle
    assert pipelined["pipeline"] == {"stages": 2, "first_layers": ["hidden", "hidden2"], "replicas": 1,
                                     "schedule": "1f1b", "microbatches": 4, "stage_costs": [4160, 2410],
                                     "cost_unit": "parameters", "stage_parameters": [4160, 2410],
                                     "built_parameters": [6570, 6570]}   # your script builds the whole model
    stages = sorted(p.name for p in (launched / "pipeline" / "checkpoints" / f"ckpt-{STEPS:08d}").iterdir())
    assert stages == ["meta.json", "stage-0", "stage-1"]   # written stage by stage
    ours, theirs = plain_keras_weights(tmp_path, launched / "pipeline" / "model.keras", launched / "dp" / "model.keras")
    assert [w.shape for w in ours] == [w.shape for w in theirs] == [(64, 64), (64,), (64, 32), (32,), (32, 10), (10,)]
    for mine, expected in zip(ours, theirs):
        assert np.max(np.abs(mine - expected)) <= 1e-5 * np.max(np.abs(expected))
    assert any(not np.array_equal(m, e) for m, e in zip(ours, theirs))   # really two trainings, not one file twice
    text = (launched / "output.txt").read_text()
    printed = re.findall(r"test accuracy ([0-9.]+); the whole model: (\S+?/model\.keras)", text)
    assert printed == [(f"{pipelined['test_accuracy']:.4f}", f"{launched / 'pipeline'}/model.keras")]   # rank 0's


def test_the_val_metrics_of_fit_are_the_whole_models_exact_metrics(launched):
    for rank in ranks(launched):
        summary, whole = rank["summaries"]["pipeline"], rank["whole_model"]
        assert whole["examples"] == summary["test_examples"] == 360
        assert (summary["test_loss"], summary["test_accuracy"]) == (whole["loss"], whole["accuracy"])
    metrics = (launched / "pipeline" / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 3 and "val_loss" in metrics[0]   # evaluated through the stages at every epoch end


def test_a_stop_mid_epoch_resumes_to_the_uninterrupted_runs_bits(launched):
    summaries = ranks(launched)[0]["summaries"]
    stopped, resumed = summaries["stopped"], summaries["resumed"]
    assert stopped["status"] == "stopped" and stopped["global_step"] == 10
    assert not (launched / "stopped" / "STOP").exists()
    assert resumed["status"] == "completed" and resumed["pipeline"]["first_layers"] == ["hidden", "hidden2"]
    assert resumed["weights_sha256"] == summaries["pipeline"]["weights_sha256"]


MISUSES = {
    "unreadable data": "unreadable or malformed held-out data",   # the first stage's error, on every rank
    "unknown layer": "parallel.split: model 'digits_mlp' has no layer 'hiden' (did you mean 'hidden'?)",
    "micro-batches": "parallel.microbatches=5 does not divide the replica batch of 64",
    "schedule": "parallel.schedule must be one of 1f1b | gpipe, got 'zigzag'",
    "metric name": "hvdtrain.keras.pipeline takes keras.metrics.Metric objects",
    "optimizer": "compile it with hvdtrain.keras.distribute(optimizer, world=world)",
    "predict": "predict with the whole model (model.keras, written by run.finish) in a world without stages",
    "whole model": "pass the stage hvdtrain.keras.pipeline returned, not the whole model",
    "resume without the stages": "was written by a 2-stage pipeline (stages beginning at hidden, hidden2) and this "
                                 "run is data-parallel training",
}


def test_misuses_stop_every_rank_with_one_line(launched):
    for rank in ranks(launched):
        assert set(rank["errors"]) == set(MISUSES)
        for case, message in MISUSES.items():
            error = rank["errors"][case]
            assert message in error and "\n" not in error, (case, error)


def test_a_gloo_launch_is_told_to_launch_with_mpi():
    proc = horovodrun(2, ["python", WORKER, "gloo"], "gloo")
    assert proc.returncode != 0
    assert "parallel.pipeline_stages=2 sends activations between stages with MPI point-to-point messages: launch " \
           "with MPI" in output(proc), output(proc)[-3000:]
