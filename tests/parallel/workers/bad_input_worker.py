"""Runs inside each rank, in a directory prepared by tests/parallel/test_bad_input_table.py: every bad-input case of
the README's table through the real CLI entry point, recording the exit code and what this rank printed.

usage: bad_input_worker.py OUT.json     (run with the prepared directory as the working directory)
"""
import contextlib
import io
import json
import sys

from hvdtrain.cli import main

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

results = {}
for name, argv in CASES.items():
    with contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(argv)
    results[name] = {"code": code, "stderr": err.getvalue()}
rank = __import__("hvdtrain.dist", fromlist=["rank_hint"]).rank_hint()
with open(f"{sys.argv[1]}.rank{rank}", "w") as f:
    json.dump(results, f, indent=1)
