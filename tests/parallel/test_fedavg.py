"""Federated averaging for real (trainer.sync=fedavg) under horovodrun: configs/digits-fedavg.yaml (100 clients holding
mostly 2 digits each, 10 sampled per round, E=5, B=10) reaches 0.90 on 2 ranks; the ranks only share the work of a
round (1 and 2 ranks train the same clients into the same model); a stop after a round resumes bit for bit; the bytes
are one weighted all-reduce of the model per round; a share that would be empty stops every rank with one line."""
import csv
import json
import subprocess

import numpy as np
import pytest

from conftest import BIN, KERAS_MAJOR, REPO, env, horovodrun, output, printed, run_commands

CONFIG = str(REPO / "configs/digits-fedavg.yaml")
HVDTRAIN = [str(BIN / "hvdtrain"), "train", "--config", CONFIG, "--trainer.progress=epoch"]
# A model with Dropout, by import path: every rank (and the single process) imports it. Keras 3 keeps its generators'
# state in variables, which each client's training seeds; Keras 2's generators are not reachable so: the MLP there.
DROPOUT = ["env", f"PYTHONPATH={REPO / 'tests' / 'fixtures'}", *HVDTRAIN, "--model.name=user_models:dropout_classifier"] \
    if KERAS_MAJOR >= 3 else HVDTRAIN
RUNS = {}


def train(run, ranks: int, *extra, command=HVDTRAIN) -> dict:
    argv = [*command, f"--trainer.run_dir={run}", *extra]
    proc = horovodrun(ranks, argv, "gloo") if ranks > 1 else \
        subprocess.run(argv, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, output(proc)[-4000:]
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def five_rounds(tmp_path_factory):
    """5-round runs of a model with Dropout on 1 and 2 ranks, each trained once, on first use."""
    root = tmp_path_factory.mktemp("fedavg")

    def get(ranks: int):
        if ranks not in RUNS:
            RUNS[ranks] = root / f"r{ranks}"
            train(RUNS[ranks], ranks, "--trainer.epochs=5", command=DROPOUT)
        return RUNS[ranks]
    return get


def test_fedavg_on_two_label_clients_reaches_90_percent(tmp_path):
    run = tmp_path / "run"
    summary = train(run, 2)
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert summary["status"] == "completed" and summary["test_accuracy"] >= 0.90 and summary["epochs"] == 60
    assert (run / "tensorboard" / "train").is_dir()   # a federated run writes TensorBoard like every other run
    assert summary["sync"] == {"mode": "fedavg"}
    assert summary["fedavg"] == {"clients": 100, "fraction": 0.1, "per_round": 10, "local_epochs": 5,
                                 "local_batch_size": 10, "partition": "labels:2", "rounds_this_run": 60,
                                 "examples_trained_this_run": 5 * sum(int(r["client_examples"]) for r in rows)}
    assert "optimizer_steps" not in summary and "global_batch_size" not in summary   # one client's; no client's
    import keras
    values = keras.saving.load_model(run / "model.keras").count_params()
    assert summary["communicated_bytes"] == 60 * (8 * values + 16)   # float64 weighted sums and two counts a round
    assert [int(r["global_step"]) for r in rows] == list(range(1, 61)) and {r["clients"] for r in rows} == {"10"}
    assert float(rows[-1]["val_accuracy"]) == pytest.approx(summary["test_accuracy"])
    clients = json.loads((run / "partition.json").read_text())["clients"]
    examples = sorted(i for c in clients for i in c["examples"])
    assert len(clients) == 100 and examples == list(range(1437))          # each training image on one client
    assert np.median([len(c["labels"]) for c in clients]) == 2           # mostly two digits each


@pytest.mark.stacks   # federated averaging runs on both stacks (its clients train with plain Keras optimizers)
def test_the_ranks_share_a_rounds_clients_and_change_nothing_else(five_rounds):
    import keras
    one, two = (keras.saving.load_model(five_rounds(n) / "model.keras").get_weights() for n in (1, 2))
    # The same clients from the same start with the same dropout masks; only the order of the float64 sum differs.
    for a, b in zip(one, two):
        assert np.max(np.abs(a - b)) <= 1e-6 * np.max(np.abs(a))
    accuracy = [[float(r["val_accuracy"]) for r in csv.DictReader((five_rounds(n) / "metrics.csv").open())]
                for n in (1, 2)]
    assert len(accuracy[0]) == 5 and np.allclose(accuracy[0], accuracy[1], atol=1.01 / 360)   # at most one example


def test_a_stop_after_a_round_resumes_bit_for_bit(five_rounds, tmp_path):
    run = tmp_path / "stopped"
    run.mkdir()
    (run / "STOP").touch()   # seen at the end of round 1, where the ranks agree
    first = train(run, 2, "--trainer.epochs=5", command=DROPOUT)
    assert first["status"] == "stopped" and first["global_step"] == 1 and not (run / "STOP").exists()
    assert (run / "checkpoints" / "ckpt-00000001").is_dir()
    resumed = train(run, 2, "--trainer.epochs=5", command=DROPOUT)   # dropout's generators: seeded per client
    uninterrupted = json.loads((five_rounds(2) / "summary.json").read_text())
    assert resumed["status"] == "completed" and resumed["weights_sha256"] == uninterrupted["weights_sha256"]
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["global_step"]) for r in rows] == [1, 2, 3, 4, 5]   # one row per round, across the resume


def test_a_round_averages_the_clients_weighted_by_their_examples(tmp_path):
    """Two clients of very different sizes (data.partition=dirichlet:0.1 with data.seed=8: 110 and 1,327 images),
    both in the one round, each taking 3 steps on its whole data (B = 0, E = 3: the order of its examples changes
    only float32 rounding). Each client trained again alone, from the same start, in a run whose data is its images
    only: the round's model is those two models averaged with weights 110 and 1,327 (computed here, in float64),
    not their plain mean, which lies far from it. One launch: the round, then the two clients' runs."""
    import keras
    from hvdtrain import data
    from hvdtrain.config import DataConfig
    from hvdtrain.data.partition import partition
    train_split = data.open_source(DataConfig()).arrays("train")
    clients = partition(train_split.y, 2, "dirichlet:0.1", seed=8)
    assert sorted(len(c) for c in clients) == [110, 1327]
    common = ["train", "--config", CONFIG, "--trainer.epochs=1", "--fedavg.fraction=1.0", "--fedavg.local_epochs=3",
              "--fedavg.local_batch_size=0", "--data.seed=8"]
    jobs = [{"name": "round", "argv": [*common, f"--trainer.run_dir={tmp_path / 'round'}", "--fedavg.clients=2",
                                       "--data.partition=dirichlet:0.1"]}]
    for k, examples in enumerate(clients):
        np.savez(tmp_path / f"client{k}.npz", x=train_split.x[examples], y=train_split.y[examples])
        jobs.append({"name": f"client{k}", "argv": [*common, f"--trainer.run_dir={tmp_path / f'client{k}'}",
                                                    "--fedavg.clients=1", "--data.partition=iid", "--data.source=npz",
                                                    f"--data.path={tmp_path / f'client{k}.npz'}"]})
    ranks = run_commands(2, jobs, tmp_path, "gloo")
    for job in jobs:
        assert [r[job["name"]]["code"] for r in ranks] == [0, 0], printed(ranks, job["name"])[-3000:]
    recorded = json.loads((tmp_path / "round" / "partition.json").read_text())["clients"]
    assert [c["examples"] for c in recorded] == [c.tolist() for c in clients]   # the round's clients are these
    averaged, *trained = (keras.saving.load_model(tmp_path / name / "model.keras").get_weights()
                          for name in ("round", "client0", "client1"))
    sizes = [len(c) for c in clients]
    for mine, *theirs in zip(averaged, *trained):
        weighted = sum(n * w.astype(np.float64) for n, w in zip(sizes, theirs)) / sum(sizes)
        plain = sum(w.astype(np.float64) for w in theirs) / len(theirs)
        scale = np.max(np.abs(weighted))
        assert np.max(np.abs(mine - weighted)) <= 1e-5 * scale
        assert np.max(np.abs(mine - plain)) > 1e-3 * scale or np.array_equal(theirs[0], theirs[1])


def test_a_client_left_without_examples_stops_every_rank_with_one_line(tmp_path):
    proc = horovodrun(2, [*HVDTRAIN, f"--trainer.run_dir={tmp_path / 'run'}", "--data.partition=dirichlet:0.01"],
                      "gloo")
    assert proc.returncode != 0
    errors = [line for line in output(proc).splitlines() if "hvdtrain: error:" in line]
    assert len(errors) == 1, output(proc)[-3000:]
    assert errors[0].endswith("without examples; use fewer fedavg.clients or a larger alpha")
    assert not (tmp_path / "run").exists()   # nothing half-written
