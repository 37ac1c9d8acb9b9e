"""Runs inside each rank: many `hvdtrain predict` / `evaluate` commands and the Keras helper, in one launch.

usage: predict_worker.py RUN_DIR INPUT_DIR OUT_DIR
Writes OUT_DIR/returncodes.json (rank 0) and the commands' outputs; with one rank also plain-Keras references:
model.predict at the batch size of the command (`hvdtrain predict` defaults to 256), on the same inputs.
"""
import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

import hvdtrain.keras as hk
from hvdtrain.cli import main
from hvdtrain.inference.run import load, locate

run, inputs, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
THREE_FILES = [i for f in range(3) for i in range(f, 50, 3)]   # the input order of three/*.tfrecord (dealt, read by file)
SIZES = (0, 1, 2, 7, 1001)
PREDICT = {f"n{n}.npy": ["--input", str(inputs / f"n{n}.npz")] for n in SIZES}
PREDICT.update({
    "n1001.csv": ["--input", str(inputs / "n1001.npz")],
    "n7.jsonl": ["--input", str(inputs / "n7.npz"), "--fields", "probs"],
    "test.npy": ["--fields", "class"],                                              # the run's own digits test split
    "train.csv": ["--input", "digits", "--split", "train", "--batch-size", "100"],
    "synthetic.jsonl": ["--input", "synthetic", "--split", "train", "--data.synthetic_samples=5"],
    "tf-one-file.npy": ["--input", str(inputs / "one")],                            # fewer files than ranks
    "tf-three-files.csv": ["--input", str(inputs / "three" / "*.tfrecord")],        # files >= ranks, uneven
})
EVALUATE = {"eval-test.json": [], "eval-train.json": ["--split", "train", "--batch-size", "64"],
            "eval-tfrecord.json": ["--input", str(inputs / "three")],
            "eval-checkpoint.json": ["--checkpoint", locate(run, None)]}   # with --run too: its config

# Bad input: every rank must return 2; the test reads what each rank printed. Outputs would go to out/bad.
BAD = {"missing run": ["predict", "--run", str(inputs / "nope"), "--output", str(out / "bad" / "p.npy")],
       "other model": ["predict", "--run", run, "--model.hidden=[16]", "--output", str(out / "bad" / "p.csv")],
       "wrong shape": ["predict", "--run", run, "--input", str(inputs / "flat.npz"), "--output", str(out / "bad" / "p.jsonl")],
       "unwritable output": ["predict", "--run", run, "--output", str(inputs / "file.txt" / "p.npy")],
       "evaluate, wrong shape": ["evaluate", "--run", run, "--input", str(inputs / "flat-labelled.npz")],
       "no checkpoint": ["evaluate", "--run", str(inputs / "untrained")]}

codes = {}
for name, args in PREDICT.items():
    codes[name] = main(["predict", "--run", run, "--output", str(out / name), *args])
for name, args in EVALUATE.items():
    codes[name] = main(["evaluate", "--run", run, "--report", str(out / name), *args])
codes["eval-checkpoint-alone.json"] = main(["evaluate", "--checkpoint", locate(run, None),  # its stored config
                                            "--report", str(out / "eval-checkpoint-alone.json")])
failures = {}
for name, args in BAD.items():
    with contextlib.redirect_stderr(io.StringIO()) as err:
        failures[name] = {"code": main(args), "stderr": err.getvalue()}

# The Keras helpers: arrays, and datasets batched or not, with or without labels.
topo = hk.init()
model = load(run, locate(run, None), []).model
x = np.load(inputs / "n1001.npz")["x"]
helper = {"keras-array": hk.predict(model, x, topo, batch_size=64),
          "keras-batched": hk.predict(model, tf.data.Dataset.from_tensor_slices((x, np.zeros(len(x)))).batch(50), topo),
          "keras-unbatched": hk.predict(model, tf.data.Dataset.from_tensor_slices(x[:7]), topo)}
labelled = tf.data.Dataset.from_tensor_slices((x, np.arange(len(x)) % 10))
metrics = {"dealt": hk.evaluate(model, labelled.batch(64).shard(topo.size, topo.rank), topo),   # one process's batches
           "sharded": hk.evaluate(model, hk.shard(labelled, topo).batch(64), topo)}             # other batches
(out / f"bad-rank{topo.rank}.json").write_text(json.dumps(failures))
if topo.is_chief:
    for name, values in helper.items():
        np.save(out / f"{name}.npy", values)
    (out / "keras-evaluate.json").write_text(json.dumps(metrics))
    if topo.size == 1:  # the independent references: plain Keras in one process, at the same batch sizes
        references = {"n1001": x, **{f"n{n}": x[:n] for n in (1, 2, 7)}, "tf-three": x[:50][THREE_FILES]}
        for name, rows in references.items():
            np.save(out / f"reference-{name}.npy", tf.nn.softmax(model.predict(rows, batch_size=256, verbose=0)).numpy())
        for batch in (64, 50, 256):
            np.save(out / f"reference-logits-b{batch}.npy", model.predict(x, batch_size=batch, verbose=0))
        np.save(out / "reference-logits-n7.npy", model.predict(x[:7], batch_size=256, verbose=0))
    (out / "returncodes.json").write_text(json.dumps(codes))
