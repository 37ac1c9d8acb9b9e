"""Pipeline and hybrid parallelism for real: `hvdtrain train --parallel.pipeline_stages=2` under horovodrun --mpi
with 2 ranks (one pipeline, D=1) and 4 (D=2, oversubscribed on 2 cores). A pipeline's update is the unsplit model's:
after one epoch (22 steps) its weights match data-parallel training of the same model, seed and data (1 rank for
D=1, 2 ranks for D=2) within float32 rounding, for both schedules; it trains digits to the guide's accuracy, its
model.keras is a plain Keras model, a stop mid-epoch resumes bit for bit, and bad layouts stop every rank with one
line. (Activations travel by MPI point-to-point, so the launch is MPI's.) The data-parallel references double as
the check that a warm-up does not depend on the number of ranks: 1, 2 and 4 ranks train the same weights."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import BIN, REPO, env, horovodrun, output, printed, run_commands

pytestmark = pytest.mark.keras3   # the pipeline needs the Keras 3 stack

HVDTRAIN = [str(BIN / "hvdtrain"), "train", "--config", str(REPO / "configs/digits.yaml")]
RUNS = {}


def train(run, ranks: int, *extra, epochs: int = 1) -> dict:
    proc = horovodrun(ranks, [*HVDTRAIN, f"--trainer.run_dir={run}", f"--trainer.epochs={epochs}", *extra], "mpi")
    assert proc.returncode == 0, output(proc)[-4000:]
    (run / "output.txt").write_text(output(proc))
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs shared by the tests below, each trained once, on first use: {key: run directory}."""
    root = tmp_path_factory.mktemp("pipeline")

    def get(ranks: int, stages: int = 1, schedule: str = "1f1b"):
        key = (ranks, stages, schedule)
        if key not in RUNS:
            RUNS[key] = root / f"r{ranks}-p{stages}-{schedule}"
            train(RUNS[key], ranks, f"--parallel.pipeline_stages={stages}", f"--parallel.schedule={schedule}",
                  "--parallel.balance=params")   # the same split in every run (a measured one may differ)
        return RUNS[key]
    return get


def weights(run) -> list:
    import keras
    return keras.saving.load_model(run / "model.keras").get_weights()


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_a_pipeline_trains_exactly_as_data_parallel_training(runs, ranks, schedule):
    pipelined, reference = runs(ranks, 2, schedule), runs(ranks // 2)
    ours, theirs = weights(pipelined), weights(reference)
    assert [w.shape for w in ours] == [w.shape for w in theirs]
    for mine, expected in zip(ours, theirs):
        assert np.max(np.abs(mine - expected)) <= 1e-5 * np.max(np.abs(expected))
    summary = json.loads((pipelined / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["num_ranks"] == ranks and summary["optimizer_steps"] == 22
    idle = summary["pipeline"].pop("idle_share")   # each rank's share of its steps spent waiting, as measured
    assert len(idle) == ranks and all(0.0 < share < 1.0 for share in idle), idle
    assert re.search(r"pipeline balance, epoch 1: share of the steps each stage waited: stage 1 \d+%, stage 2 \d+% "
                     r"\(equal stages: 20%\)", (pipelined / "output.txt").read_text())
    # Every rank but 0 made only its own stage's weights (rank 0 keeps the whole model to write model.keras); the
    # same initial weights as the unsplit model's all the same, or the weights above would differ.
    stage_parameters = [16640, 34186] * (ranks // 2)
    assert summary["pipeline"] == {"stages": 2, "first_layers": ["flatten", "dense_1"], "replicas": ranks // 2,
                                   "schedule": schedule, "microbatches": 4, "stage_costs": [16640, 34186],
                                   "cost_unit": "parameters", "stage_parameters": stage_parameters,
                                   "built_parameters": [16640 + 34186, *stage_parameters[1:]]}
    stages = sorted(p.name for p in (pipelined / "checkpoints" / "ckpt-00000022").iterdir())
    assert stages == ["meta.json", "stage-0", "stage-1"]   # each stage's weights and optimizer, one checkpoint
    # Bytes counted where they are sent: each of 22 steps sends a replica batch of 64 / D examples' 256-wide
    # activations forward (stage 1) or their gradients back (stage 2), in float32; with D = 2 each stage also
    # all-reduces its own parameters' gradients over its replicas.
    replicas = ranks // 2
    for rank, sent in enumerate(summary["communicated"]):
        expected = {"activations": {"float32": 22 * (64 // replicas) * 256 * 4}}
        if replicas > 1:
            expected["gradients"] = {"float32": 22 * stage_parameters[rank % 2] * 4}
        assert {kind: sent[kind] for kind in ("activations", "gradients") if kind in sent} == expected, (rank, sent)


def test_a_warm_up_trains_the_same_weights_on_1_2_and_4_ranks(runs):
    """configs/digits.yaml warms up over its first epoch with lr_scaling=none: the global batch and every step's
    learning rate are the same on any number of ranks, so the weights are too, up to the float32 rounding of the
    averages. (A warm-up from lr/n would start 2 ranks at half and 4 at a quarter of 1 rank's rate.)"""
    import yaml
    trained = yaml.safe_load((runs(4) / "config.yaml").read_text())["optim"]
    assert (trained["warmup_epochs"], trained["lr_scaling"]) == (1.0, "none")   # this epoch is all warm-up
    one = weights(runs(1))
    for ranks in (2, 4):
        assert json.loads((runs(ranks) / "summary.json").read_text())["num_ranks"] == ranks
        for mine, expected in zip(weights(runs(ranks)), one):
            assert np.max(np.abs(mine - expected)) <= 1e-5 * np.max(np.abs(expected)), ranks


def test_a_stop_mid_epoch_resumes_bit_for_bit(runs, tmp_path):
    run = tmp_path / "stopped"
    run.mkdir()
    (run / "STOP").touch()   # seen at the first agreement step (10), by every rank of both stages
    first = train(run, 2, "--parallel.pipeline_stages=2", "--parallel.balance=params")
    assert first["status"] == "stopped" and first["global_step"] == 10 and not (run / "STOP").exists()
    resumed = train(run, 2, "--parallel.pipeline_stages=2")   # measured balance: the checkpoint's split is kept
    uninterrupted = json.loads((runs(2, 2, "1f1b") / "summary.json").read_text())
    assert resumed["status"] == "completed" and resumed["weights_sha256"] == uninterrupted["weights_sha256"]


PLAIN_KERAS = """
import sys, numpy as np, keras
assert "hvdtrain" not in sys.modules and "horovod" not in sys.modules
model = keras.saving.load_model(sys.argv[1])
data = np.load(sys.argv[2])
print(int(np.sum(np.argmax(model.predict(data["x"], verbose=0), axis=-1) == data["y"])))
"""


@pytest.mark.parametrize("ranks", [2, 4])
def test_the_digits_job_reaches_the_readme_accuracy_and_exports_one_plain_keras_model(tmp_path, ranks):
    from hvdtrain import data
    from hvdtrain.config import DataConfig
    summary = train(tmp_path / "run", ranks, "--parallel.pipeline_stages=2", epochs=30)
    assert summary["status"] == "completed" and summary["test_accuracy"] >= 0.95, summary
    source = data.open_source(DataConfig())
    test = source.arrays("test")
    x, y = test.x, test.y
    np.savez(tmp_path / "test.npz", x=x, y=y)
    plain = subprocess.run([sys.executable, "-c", PLAIN_KERAS, str(tmp_path / "run" / "model.keras"),
                            str(tmp_path / "test.npz")], env=env(), capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert int(plain.stdout.split()[-1]) == summary["test_correct"] and len(y) == summary["test_examples"]
    report = tmp_path / "evaluate.json"   # `hvdtrain evaluate` reads the stages' checkpoint as one model
    evaluated = subprocess.run([str(BIN / "hvdtrain"), "evaluate", "--run", str(tmp_path / "run"), "--report",
                                str(report)], env=env(), capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, output(evaluated)[-3000:]
    metrics = json.loads(report.read_text())
    assert (metrics["loss"], metrics["accuracy"]) == (summary["test_loss"], summary["test_accuracy"]), metrics
    staged = horovodrun(ranks, [str(BIN / "hvdtrain"), "evaluate", "--run", str(tmp_path / "run"), "--report",
                                str(report), "--parallel.pipeline_stages=2"], "mpi")   # through the 2 stages
    assert staged.returncode == 0, output(staged)[-3000:]
    metrics = json.loads(report.read_text())
    assert (metrics["loss"], metrics["accuracy"], metrics["ranks"]) == (summary["test_loss"],
                                                                        summary["test_accuracy"], ranks), metrics
    if ranks == 4:   # predict through 2 stages x 2 replicas: the same bytes as one process with the whole model
        whole, staged = tmp_path / "whole.csv", tmp_path / "staged.csv"
        predicted = subprocess.run([str(BIN / "hvdtrain"), "predict", "--run", str(tmp_path / "run"), "--output",
                                    str(whole), "--batch-size", "100"], env=env(), capture_output=True, text=True,
                                   timeout=300)
        assert predicted.returncode == 0, output(predicted)[-3000:]
        proc = horovodrun(ranks, [str(BIN / "hvdtrain"), "predict", "--run", str(tmp_path / "run"), "--output",
                                  str(staged), "--batch-size", "100", "--parallel.pipeline_stages=2"], "mpi")
        assert proc.returncode == 0, output(proc)[-3000:]
        assert staged.read_bytes() == whole.read_bytes() and len(whole.read_text().splitlines()) == len(y) + 1
        assert not list(tmp_path.glob(".*part*")), "part files left behind"


def layer_weights(run) -> dict:
    import keras
    model = keras.saving.load_model(run / "model.keras")
    return {layer.name: layer.get_weights() for layer in model.layers if layer.weights}


def test_frozen_layers_keep_their_bits_and_a_frozen_stage_runs_forward_only(tmp_path):
    """model.trainable_from=dense_1 freezes the MLP's first Dense layer, all of stage 1 when the split is at dense_1.
    One launch of 2 ranks, an epoch each: that pipeline (stage 1 runs no backward pass and stage 2 sends it no
    gradient: were the two to disagree, the step would hang), then data-parallel training on the same batches and on
    other ones (another data.seed). The frozen weights are the same bits in all three (training never touches
    them) while the others differ with the batches, and the pipeline trains the rest as data-parallel training does
    (its D=1 against D=2: warm-up and global batch do not depend on the ranks)."""
    frozen = ["--config", str(REPO / "configs/digits.yaml"), "--trainer.epochs=1", "--model.trainable_from=dense_1"]
    runs = {"pipeline": ["--parallel.pipeline_stages=2", "--parallel.split=[dense_1]"], "dp": [],
            "dp-other-batches": ["--data.seed=99"]}
    jobs = [{"name": name, "argv": ["train", f"--trainer.run_dir={tmp_path / name}", *frozen, *extra]}
            for name, extra in runs.items()]
    ranks = run_commands(2, jobs, tmp_path, "mpi", timeout=300)   # a hang guard: the three take ~30 s
    for job in jobs:
        assert [r[job["name"]]["code"] for r in ranks] == [0, 0], printed(ranks, job["name"])[-3000:]
    pipelined, dp, other = (layer_weights(tmp_path / name) for name in runs)
    assert list(dp) == ["dense", "dense_1", "dense_2"]
    for weights_ in (pipelined, other):
        assert all(np.array_equal(a, b) for a, b in zip(weights_["dense"], dp["dense"]))   # frozen: the same bits
    for name in ("dense_1", "dense_2"):
        assert all(not np.array_equal(a, b) for a, b in zip(other[name], dp[name]))       # trained
        for mine, expected in zip(pipelined[name], dp[name]):
            assert np.max(np.abs(mine - expected)) <= 1e-5 * np.max(np.abs(expected)), name
    summary = json.loads((tmp_path / "pipeline" / "summary.json").read_text())
    assert summary["pipeline"]["first_layers"] == ["flatten", "dense_1"] and summary["optimizer_steps"] == 22
    # Bytes counted where they are sent: data-parallel ranks all-reduce only the trainable layers' gradients (dense_1
    # and dense_2: 34,186 parameters) in each of 22 steps; in the pipeline, stage 1 sends its activations (a batch of
    # 64 x 256 floats a step) and stage 2 sends no gradient back.
    dp_sent = json.loads((tmp_path / "dp" / "summary.json").read_text())["communicated"]
    assert [rank["gradients"] for rank in dp_sent] == [{"float32": 22 * 34186 * 4}] * 2
    assert [rank.get("activations") for rank in summary["communicated"]] == [{"float32": 22 * 64 * 256 * 4}, None]


CASES = {
    "more stages than ranks": (["--parallel.pipeline_stages=3"],
                               "parallel.pipeline_stages=3: 3 stages need at least 3 ranks; 2 are running"),
    "unknown layer": (["--parallel.pipeline_stages=2", "--parallel.split=[dense_9]"],
                      "parallel.split: model 'mlp' has no layer 'dense_9' (did you mean 'dense_2'?)"),
    "cut through a residual block": (["--parallel.pipeline_stages=2", "--model.name=resnet", "--model.blocks=1",
                                      "--parallel.split=[add]"], "a cut before 'add' crosses 2 tensors"),
    "micro-batches not dividing the batch": (["--parallel.pipeline_stages=2", "--parallel.microbatches=5"],
                                             "parallel.microbatches=5 does not divide the replica batch of 64"),
    "unknown schedule": (["--parallel.pipeline_stages=2", "--parallel.schedule=zigzag"],
                         "parallel.schedule must be one of 1f1b | gpipe, got 'zigzag'"),
    "resume without the stages": ([], "was written by a 2-stage pipeline (stages beginning at flatten, dense_1) and "
                                      "this run is data-parallel training"),
}


def test_bad_layouts_stop_every_rank_with_one_line_before_any_step(tmp_path):
    shared = tmp_path / "runs" / "resume"
    jobs = [{"name": "pipeline", "argv": ["train", f"--trainer.run_dir={shared}", "--trainer.epochs=1",
                                          "--parallel.pipeline_stages=2", "--parallel.balance=params"]}]
    # (first: Horovod starts with the stages' process sets)
    for case, (args, _) in CASES.items():
        run = shared if case == "resume without the stages" else tmp_path / "runs" / case.replace(" ", "-")
        jobs.append({"name": case, "argv": ["train", f"--trainer.run_dir={run}", "--trainer.epochs=2", *args]})
    ranks = run_commands(2, jobs, tmp_path, "mpi")
    assert [r["pipeline"]["code"] for r in ranks] == [0, 0], printed(ranks, "pipeline")[-3000:]
    for case, (_, message) in CASES.items():
        text = printed(ranks, case)
        errors = [line for line in text.splitlines() if "hvdtrain: error:" in line]
        assert [r[case]["code"] for r in ranks] == [2, 2] and len(errors) == 1, (case, text[-3000:])
        assert message in errors[0] and "Traceback" not in text, (case, errors)
        assert case == "resume without the stages" or not (tmp_path / "runs" / case.replace(" ", "-")).exists()
    assert sorted(p.name for p in (shared / "checkpoints").iterdir()) == ["ckpt-00000022"]   # untouched


def test_a_gloo_launch_is_told_to_launch_with_mpi(tmp_path):
    """As a user meets it, scripts/launch.sh with HVDTRAIN_CONTROLLER=gloo: the one line and exit 2, as under MPI
    (horovodrun's traceback and its notes about the ranks it stopped condensed to one line)."""
    proc = subprocess.run([str(REPO / "scripts/launch.sh"), "2", *HVDTRAIN, f"--trainer.run_dir={tmp_path / 'run'}",
                           "--parallel.pipeline_stages=2"], cwd=REPO, env={**env(), "HVDTRAIN_CONTROLLER": "gloo"},
                          capture_output=True, text=True, timeout=300)
    text = output(proc)
    errors = [line for line in text.splitlines() if "hvdtrain: error:" in line]
    assert proc.returncode == 2 and len(errors) == 1, text[-3000:]
    assert "sends activations between stages with MPI point-to-point messages: launch with MPI" in errors[0]
    assert re.search(r"^launch\.sh: rank [01] exited with code 2; horovodrun ended the job$", text, re.M), text
    assert "Traceback" not in text and "Terminated" not in text and "exit with status code" not in text, text
    assert not (tmp_path / "run").exists()
