"""The bad-input table of docs/reliability.md is true: every row's line is exactly what `hvdtrain` prints, under horovodrun -np 2
(MPI, as `make train` launches), once (by rank 0), with exit code 2 on every rank and no traceback.

All cases run in one launch (tests/parallel/workers/commands_worker.py), in a directory prepared here, with the
relative paths a user would type. On a mismatch the test prints the table as it should read.
"""
import re

import numpy as np
import pytest

from conftest import KERAS_MAJOR, REPO, hvdtrain, output, run_commands

BEGIN, END = "<!-- bad-input-table", "<!-- /bad-input-table -->"

DIGITS = ["--trainer.epochs=1", "--trainer.tensorboard=false", "--trainer.progress=none"]
TRAIN = ["train", *DIGITS]
NPZ = ["--data.source=npz", "--data.input_shape=[4]"]
TFR = ["--data.source=tfrecord", "--data.input_shape=[4]"]
IMAGES = ["--data.source=images", "--data.image_size=[8,8]", "--model.name=cnn", "--model.width=4"]

CASES = {
    # the config
    "malformed YAML": [*TRAIN, "--config", "bad.yaml"],
    "config file not found": [*TRAIN, "--config", "no-such.yaml"],
    "unknown key": [*TRAIN, "--trainer.epoch=3"],
    "unknown section": [*TRAIN, "--trainr.epochs=3"],
    "wrong type": [*TRAIN, "--trainer.epochs=many"],
    "not one of the choices": [*TRAIN, "--optim.name=adamw"],
    "value out of range": [*TRAIN, "--optim.lr=-1"],
    "global batch not divisible by the ranks": [*TRAIN, "--trainer.global_batch_size=63"],
    "another number of ranks than the config expects": [*TRAIN, "--runtime.expected_ranks=3"],
    # the data
    "missing data file": [*TRAIN, *NPZ, "--data.path=data/missing.npz"],
    ".npz without x and y": [*TRAIN, *NPZ, "--data.path=data/no-xy.npz"],
    ".npz with fewer labels than examples": [*TRAIN, *NPZ, "--data.path=data/rows.npz"],
    "empty dataset": [*TRAIN, *NPZ, "--data.path=data/empty.npz"],
    "label outside the classes": [*TRAIN, *NPZ, "--data.path=data/labels.npz"],
    "NaN or Inf in the features": [*TRAIN, *NPZ, "--data.path=data/nan.npz"],
    "examples of another shape than data.input_shape": [*TRAIN, "--data.source=npz", "--data.input_shape=[5]",
                                                        "--data.path=data/ok.npz"],
    "fewer examples than one global batch": [*TRAIN, *NPZ, "--data.path=data/tiny.npz"],
    "no TFRecord files": [*TRAIN, *TFR, "--data.path=records/none-*.tfrecord"],
    "corrupt TFRecord (training data)": [*TRAIN, *TFR, "--data.path=records/corrupt"],
    "corrupt TFRecord (held-out data)": [*TRAIN, *TFR, "--data.path=records/good", "--data.test_path=records/held-out"],
    "TFRecord features of another shape": [*TRAIN, "--data.source=tfrecord", "--data.input_shape=[5]",
                                           "--data.path=records/good"],
    "image directory missing": [*TRAIN, *IMAGES, "--data.path=images/missing"],
    "image directory without class folders": [*TRAIN, *IMAGES, "--data.path=images/flat"],
    "corrupt image": [*TRAIN, *IMAGES, "--data.path=images/corrupt"],
    "empty class folder": [*TRAIN, *IMAGES, "--data.path=images/empty-class"],
    "TFDS dataset not prepared": [*TRAIN, "--data.source=tfds", "--data.path=tfds", "--data.tfds_name=my_set",
                                  "--data.image_size=[8,8]"],
    "regression labels for a classification source": [*TRAIN, *IMAGES, "--data.path=images/corrupt",
                                                       "--data.task=regression"],
    # the model
    "unknown model": [*TRAIN, "--model.name=resnt"],
    "model by import path that does not import": [*TRAIN, "--model.name=my_models:build"],
    "inputs too small for a keras.applications model": [*TRAIN, "--data.source=synthetic", "--data.input_shape=[8,8,3]",
                                                        "--model.name=ResNet50"],
    # the run directory and its checkpoints
    "unwritable run directory": [*TRAIN, "--trainer.run_dir=a-file/run"],
    "checkpoint of another model": [*TRAIN, "--trainer.run_dir=trained", "--model.hidden=[32]"],
    "resume required but no checkpoint": [*TRAIN, "--trainer.run_dir=fresh", "--resume"],
    "resume refused but a checkpoint exists": ["train", *DIGITS, "--trainer.run_dir=trained", "--model.hidden=[16]",
                                               "--no-resume"],
    # predict and evaluate
    "predict: no such run": ["predict", "--run", "no-such-run", "--output", "out/p.csv"],
    "predict: run without a checkpoint": ["predict", "--run", "untrained", "--output", "out/p.csv"],
    "predict: unwritable output": ["predict", "--run", "trained", "--model.hidden=[16]", "--output", "a-file/p.npy"],
    "predict: unknown output format": ["predict", "--run", "trained", "--model.hidden=[16]", "--output", "out/p.txt"],
    "predict: fields the task does not have": ["predict", "--run", "trained", "--model.hidden=[16]", "--fields",
                                               "value", "--output", "out/p.csv"],
    "predict: --input that does not exist (a run trained on images)": ["predict", "--run", "trained-images", "--input",
                                                                       "bad/nope", "--output", "out/p.csv"],
    "evaluate: inputs of another shape": ["evaluate", "--run", "trained", "--model.hidden=[16]", "--input",
                                          "data/ok.npz"],
}


def prepare(root):
    import tensorflow as tf
    from hvdtrain.data import write_tfrecords
    (root / "bad.yaml").write_text("trainer:\n  epochs: 3\n   run_dir: x\n")
    (root / "a-file").write_text("")
    data = root / "data"
    data.mkdir()
    np.savez(data / "no-xy.npz", a=np.zeros(3))
    np.savez(data / "rows.npz", x=np.zeros((4, 4), np.float32), y=np.zeros(3))
    np.savez(data / "empty.npz", x=np.zeros((0, 4), np.float32), y=np.zeros(0))
    np.savez(data / "labels.npz", x=np.zeros((100, 4), np.float32), y=np.full(100, 12))
    nan = np.ones((100, 4), np.float32)
    nan[5, 2] = np.nan
    np.savez(data / "nan.npz", x=nan, y=np.zeros(100))
    np.savez(data / "ok.npz", x=np.zeros((100, 4), np.float32), y=np.zeros(100))
    np.savez(data / "tiny.npz", x=np.zeros((10, 4), np.float32), y=np.zeros(10))
    records = root / "records"
    for name in ("corrupt", "good", "held-out"):
        (records / name).mkdir(parents=True)
        n = 20 if name == "held-out" else 40
        write_tfrecords(np.zeros((n, 4), np.float32), np.zeros(n, np.int64),
                        [str(records / name / f"{part}.tfrecord") for part in ("a", "b")])
    corrupt = records / "corrupt" / "b.tfrecord"
    blob = bytearray(corrupt.read_bytes())
    blob[30:60] = b"\xff" * 30
    corrupt.write_bytes(bytes(blob))
    cut = records / "held-out" / "b.tfrecord"
    cut.write_bytes(cut.read_bytes()[:-37])            # its last 37 bytes cut off
    png = tf.io.encode_png(tf.zeros((8, 8, 3), tf.uint8)).numpy()
    for cls in ("cat", "dog"):
        (root / "images" / "corrupt" / cls).mkdir(parents=True)
        for i in range(3):
            (root / "images" / "corrupt" / cls / f"{i}.png").write_bytes(png)
    (root / "images" / "corrupt" / "dog" / "2.png").write_bytes(png[:40])   # a truncated PNG
    (root / "images" / "flat").mkdir()
    (root / "images" / "flat" / "0.png").write_bytes(png)
    for folder, counts in (("ok", {"cat": 4, "dog": 4}), ("empty-class", {"cat": 2, "dog": 0})):
        for cls, n in counts.items():
            (root / "images" / folder / cls).mkdir(parents=True)
            for i in range(n):
                (root / "images" / folder / cls / f"{i}.png").write_bytes(png)
    (root / "tfds").mkdir()
    (root / "untrained").mkdir()
    (root / "untrained" / "config.yaml").write_text("data:\n  source: digits\n")
    (root / "out").mkdir()
    trained = hvdtrain(["train", "--trainer.run_dir=trained", "--model.hidden=[16]", "--trainer.epochs=1",
                        "--trainer.tensorboard=false"], cwd=root)
    assert trained.returncode == 0, output(trained)
    trained = hvdtrain(["train", "--trainer.run_dir=trained-images", "--data.source=images", "--data.path=images/ok",
                        "--data.image_size=[8,8]", "--model.name=cnn", "--model.width=4", "--trainer.epochs=1",
                        "--trainer.global_batch_size=2", "--trainer.tensorboard=false"], cwd=root)
    assert trained.returncode == 0, output(trained)


def documented_table() -> dict:
    text = (REPO / "docs/reliability.md").read_text()
    block = text[text.index(BEGIN):text.index(END)] if BEGIN in text and END in text else ""
    rows = {}
    for line in block.splitlines():
        found = re.fullmatch(r"\| (.+?) \| ``(.+)`` \|", line.strip())
        if found:
            rows[found.group(1)] = found.group(2)
    return rows


@pytest.fixture(scope="module")
def printed(tmp_path_factory):
    """Every case through the real CLI entry point in one launch (tests/parallel/workers/commands_worker.py), with
    the prepared directory as the working directory: per rank, {case: {"code", "stdout", "stderr"}}."""
    root = tmp_path_factory.mktemp("bad-input")
    prepare(root)
    (root / "results").mkdir()
    jobs = [{"name": case, "argv": argv} for case, argv in CASES.items()]
    return run_commands(2, jobs, root / "results", "mpi", timeout=900, cwd=root)


def test_every_case_stops_every_rank_with_one_line(printed):
    for case in printed[0]:
        codes = [rank[case]["code"] for rank in printed]
        lines = [line for rank in printed for line in rank[case]["stderr"].splitlines()]
        assert codes == [2, 2], (case, codes)
        assert len(lines) == 1 and lines[0].startswith("hvdtrain: error: "), (case, lines)   # printed once
        assert "Traceback" not in printed[0][case]["stderr"] + printed[1][case]["stderr"]
        assert "function_node" not in lines[0] and "\n" not in lines[0].strip()


def test_the_documented_table_shows_exactly_those_lines(printed):
    actual = {case: next(line for rank in printed for line in rank[case]["stderr"].splitlines())
              .removeprefix("hvdtrain: error: ") for case in printed[0]}
    table = documented_table()
    if KERAS_MAJOR < 3:   # the table shows TF 2.21's lines; Keras 2 names a weight without its model's name
        table = {case: line.replace("(weight 0, mlp/dense/kernel:", "(weight 0, dense/kernel:") for case, line in table.items()}
    expected = "\n".join(f"| {case} | ``{message}`` |" for case, message in actual.items())
    assert len(table) >= 25
    assert table == actual, f"docs/reliability.md's bad-input table should read:\n{expected}"
