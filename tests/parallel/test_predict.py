"""Under horovodrun -np 2 (MPI) and -np 3 (Gloo, oversubscribed): predict and evaluate equal one process bit for bit,
and plain Keras at the same batch size, on any CPU (every example is computed in the same batch at any rank count).

One launch per rank count runs every case (tests/parallel/workers/predict_worker.py): `hvdtrain predict` on
inputs of 0, 1, 2, 7 and 1001 examples (.npz), the digits splits, synthetic data and TFRecord files (fewer
files than ranks, and uneven files), in the three output formats; `hvdtrain evaluate`; hvdtrain.keras.predict and
evaluate.
"""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import KERAS_MAJOR, REPO, env, horovodrun, output
from hvdtrain import data
from predict_fixtures import inputs, trained_run

pytestmark = pytest.mark.stacks    # also on the TF 2.15 stack: see docs/testing.md

WORKER = str(REPO / "tests/parallel/workers/predict_worker.py")
LAUNCHES = {2: "mpi", 3: "gloo"}
# Rank counts compared with one process. On TF 2.15 (the stacks tier) 2 only: what 3 oversubscribed ranks add, an
# uneven deal of the batches, is the same source on both stacks and is checked on TF 2.21.
RANKS = [2, 3] if KERAS_MAJOR >= 3 else [2]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(run directory, {ranks: output directory} for 1 (no launcher), 2 and 3 ranks, input directory)."""
    run, folder = trained_run(tmp_path_factory), tmp_path_factory.mktemp("predict-inputs")
    for n in (0, 1, 2, 7, 1001):
        np.savez(folder / f"n{n}.npz", x=inputs(n))
    x = inputs(1001)
    for name, files, n in (("one", 1, 7), ("three", 3, 50)):
        (folder / name).mkdir()
        data.write_tfrecords(x[:n], np.zeros(n, np.int64), [str(folder / name / f"part-{i}.tfrecord") for i in range(files)])
    np.savez(folder / "flat.npz", x=np.zeros((5, 64), np.float32))
    np.savez(folder / "flat-labelled.npz", x=np.zeros((5, 64), np.float32), y=np.zeros(5, np.int64))
    (folder / "file.txt").write_text("a file, not a directory")
    (folder / "untrained" / "checkpoints").mkdir(parents=True)
    (folder / "untrained" / "config.yaml").write_text("data:\n  source: digits\n")
    outs = {}
    for ranks in (1, *RANKS):
        outs[ranks] = tmp_path_factory.mktemp(f"predict-np{ranks}")
        (outs[ranks] / "bad").mkdir()
        args = [WORKER, str(run), str(folder), str(outs[ranks])]
        proc = subprocess.run([sys.executable, *args], env=env(), capture_output=True, text=True, timeout=300) \
            if ranks == 1 else horovodrun(ranks, ["python", *args], LAUNCHES[ranks])
        assert proc.returncode == 0, output(proc)
        codes = json.loads((outs[ranks] / "returncodes.json").read_text())
        assert codes and set(codes.values()) == {0}, (codes, output(proc))
    return run, outs, folder


@pytest.mark.parametrize("ranks", RANKS)
def test_predict_files_equal_single_process_byte_for_byte(runs, ranks):
    outs = runs[1]
    names = [p.name for p in outs[1].iterdir() if p.suffix in (".npy", ".csv", ".jsonl") and p.is_file()
             and not p.name.startswith(("keras-", "reference-"))]
    assert len(names) == 12
    for name in names:
        assert (outs[ranks] / name).read_bytes() == (outs[1] / name).read_bytes(), f"{name} differs on {ranks} ranks"
    assert not [p.name for p in outs[ranks].iterdir() if p.name.startswith(".")], "part or temporary files left behind"


def test_single_process_predictions_are_plain_keras_in_input_order(runs):
    """Bit for bit plain Keras at the same batch size (the rank counts are compared with one process above)."""
    out = runs[1][1]
    reference = np.load(out / "reference-n1001.npy")          # softmax(model.predict(x, batch_size=256))
    full = np.load(out / "n1001.npy")
    assert full.dtype.names == ("class", "probs") and full.shape == (1001,)
    assert np.array_equal(full["probs"], reference) and np.array_equal(full["class"], reference.argmax(1))
    assert np.load(out / "n0.npy").shape == (0,)
    for n in (1, 2, 7):
        part = np.load(out / f"n{n}.npy")
        assert part.shape == (n,) and np.array_equal(part["probs"], np.load(out / f"reference-n{n}.npy"))
    rows = list(csv.reader((out / "n1001.csv").open()))
    assert rows[0] == ["index", "class"] + [f"prob_{c}" for c in range(10)]
    assert [int(r[0]) for r in rows[1:]] == list(range(1001))
    assert np.array_equal(np.array([r[2:] for r in rows[1:]], dtype=np.float32), reference)
    lines = [json.loads(line) for line in (out / "n7.jsonl").read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(7)) and "class" not in lines[0]
    assert np.array_equal(np.array([line["probs"] for line in lines], dtype=np.float32), np.load(out / "reference-n7.npy"))
    # TFRecord input order is file by file: the rows must follow it, not the order the ranks read them in.
    assert np.array_equal(np.load(out / "tf-one-file.npy")["probs"], np.load(out / "reference-n7.npy"))
    three = list(csv.reader((out / "tf-three-files.csv").open()))[1:]
    assert np.array_equal(np.array([r[2:] for r in three], dtype=np.float32), np.load(out / "reference-tf-three.npy"))
    assert np.load(out / "test.npy").shape == (360,) and np.load(out / "test.npy").dtype == np.int64
    assert len((out / "train.csv").read_text().splitlines()) == 1 + 1437
    assert len((out / "synthetic.jsonl").read_text().splitlines()) == 5


@pytest.mark.parametrize("ranks", RANKS)
def test_evaluate_equals_single_process_exactly(runs, ranks):
    run, outs, _ = runs
    for name in ("eval-test.json", "eval-train.json", "eval-tfrecord.json", "eval-checkpoint.json",
                 "eval-checkpoint-alone.json"):
        one, many = (json.loads((outs[r] / name).read_text()) for r in (1, ranks))
        assert many["ranks"] == ranks and one["ranks"] == 1
        assert {**many, "ranks": 1} == one, name   # bit for bit, the loss included
    test = json.loads((outs[1] / "eval-test.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert test["examples"] == 360 and test["accuracy"] == summary["test_accuracy"]
    for name in ("eval-checkpoint.json", "eval-checkpoint-alone.json"):   # the same (latest) checkpoint
        assert json.loads((outs[1] / name).read_text()) == test
    assert json.loads((outs[1] / "eval-train.json").read_text())["examples"] == 1437
    assert json.loads((outs[1] / "eval-tfrecord.json").read_text())["examples"] == 50


@pytest.mark.parametrize("ranks", [1, *RANKS])
def test_keras_predict_returns_model_outputs_in_order(runs, ranks):
    """Bit for bit model.predict at the batch size used: batch_size for arrays and unbatched datasets, a batched
    dataset's own batches."""
    out, one = runs[1][ranks], runs[1][1]
    assert np.load(one / "reference-logits-b64.npy").shape == (1001, 10)
    assert np.array_equal(np.load(out / "keras-array.npy"), np.load(one / "reference-logits-b64.npy"))
    assert np.array_equal(np.load(out / "keras-batched.npy"), np.load(one / "reference-logits-b50.npy"))
    assert np.array_equal(np.load(out / "keras-unbatched.npy"), np.load(one / "reference-logits-n7.npy"))


@pytest.mark.parametrize("ranks", RANKS)
def test_keras_evaluate_is_exact_on_dealt_batches_and_within_its_stated_tolerance_otherwise(runs, ranks):
    one, many = (json.loads((runs[1][r] / "keras-evaluate.json").read_text()) for r in (1, ranks))
    assert many["dealt"] == one["dealt"] and one["dealt"]["examples"] == 1001
    assert one["sharded"] == one["dealt"]                   # one rank: the same batches either way
    assert many["sharded"]["examples"] == 1001 and many["sharded"]["correct"] == one["dealt"]["correct"]
    assert abs(many["sharded"]["loss"] - one["dealt"]["loss"]) <= 1e-6 * one["dealt"]["loss"]


BAD_INPUT = {
    "missing run": "run directory {inputs}/nope does not exist; pass the trainer.run_dir of a `hvdtrain train` run",
    "other model": "kernel: shape [64, 16] here, [64, 32] in the checkpoint",
    "wrong shape": "{inputs}/flat.npz: examples have shape [64] but the model expects [8, 8, 1]",
    "unwritable output": "cannot write --output {inputs}/file.txt/p.npy (Not a directory); choose a writable path",
    "evaluate, wrong shape": "{inputs}/flat-labelled.npz: examples have shape [64] but the model expects [8, 8, 1]",
    "no checkpoint": "run directory {inputs}/untrained holds no checkpoint yet; train first",
}


@pytest.mark.parametrize("ranks", [1, *RANKS])
def test_bad_input_fails_on_every_rank_with_one_line_and_no_output(runs, ranks):
    _, outs, inputs = runs
    out = outs[ranks]
    per_rank = [json.loads((out / f"bad-rank{r}.json").read_text()) for r in range(ranks)]
    assert set(per_rank[0]) == set(BAD_INPUT)
    for case, message in BAD_INPUT.items():
        assert [r[case]["code"] for r in per_rank] == [2] * ranks, case
        lines = [line for r in per_rank for line in r[case]["stderr"].splitlines()]
        assert len(lines) == 1 and lines[0].startswith("hvdtrain: error: "), (case, lines)
        assert message.format(inputs=inputs) in lines[0], (case, lines)
    assert list((out / "bad").iterdir()) == [], "an output or part file was left behind"
    assert not [p.name for p in inputs.iterdir() if p.name.startswith(".")]
