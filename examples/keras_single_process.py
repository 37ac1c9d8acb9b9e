"""The plain, single-process Keras script that examples/keras_resumable.py makes data-parallel and preemptible.
docs/keras-script.md ("Your own Keras script") shows the diff between the two; a test keeps it true.

    .venv/bin/python examples/keras_single_process.py --run-dir runs/single --epochs 10
"""
import argparse
import glob
import os

import keras
import numpy as np
import tensorflow as tf


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="the data (without --data) and the saved model go here")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--global-batch", type=int, default=64, help="examples per step")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--data", help="directory of training TFRecords (features x: 64 floats, y: int64)")
    p.add_argument("--deterministic", action="store_true", help="bit-for-bit repeatable (CPU)")
    return p.parse_args()


def digits_tfrecords(folder: str) -> str:
    """Digits as 3 TFRecord files of different sizes, plus a held-out .npz."""
    from sklearn.datasets import load_digits
    if not os.path.exists(os.path.join(folder, "test.npz")):
        os.makedirs(folder, exist_ok=True)
        d = load_digits()
        x, y = (d.images / 16.0).reshape(-1, 64).astype(np.float32), d.target.astype(np.int64)
        for i, (a, b) in enumerate(((0, 700), (700, 1000), (1000, 1437))):   # 700, 300 and 437 examples
            with tf.io.TFRecordWriter(os.path.join(folder, f"part-{i}.tfrecord")) as writer:
                for xi, yi in zip(x[a:b], y[a:b]):
                    writer.write(example(xi, yi))
        np.savez(os.path.join(folder, "test.npz"), x=x[1437:], y=y[1437:])
    return folder


def example(x, y) -> bytes:
    return tf.train.Example(features=tf.train.Features(feature={
        "x": tf.train.Feature(float_list=tf.train.FloatList(value=x.tolist())),
        "y": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(y)]))})).SerializeToString()


def parse(record):
    ex = tf.io.parse_single_example(record, {"x": tf.io.FixedLenFeature([64], tf.float32),
                                             "y": tf.io.FixedLenFeature([], tf.int64)})
    return ex["x"], ex["y"]


def main():
    args = parse_args()
    keras.utils.set_random_seed(42)
    if args.deterministic:
        tf.config.experimental.enable_op_determinism()
    data = args.data or digits_tfrecords(os.path.join(args.run_dir, "data"))
    batch = args.global_batch
    records = tf.data.TFRecordDataset(sorted(glob.glob(os.path.join(data, "*.tfrecord"))))
    steps = int(records.reduce(0, lambda n, _: n + 1)) // batch

    def epoch_batches(epoch):   # epoch e's batches
        return records.shuffle(2048, seed=1000 + epoch, reshuffle_each_iteration=False).map(parse) \
            .batch(batch, drop_remainder=True)

    held_out = np.load(os.path.join(data, "test.npz"))
    test = tf.data.Dataset.from_tensor_slices((held_out["x"], held_out["y"])).batch(256)

    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(128, activation="relu"),
                              keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)], name="digits_mlp")
    optimizer = keras.optimizers.SGD(args.lr, momentum=0.9)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])

    stream = epoch_batches(0)
    for epoch in range(1, args.epochs):
        stream = stream.concatenate(epoch_batches(epoch))
    model.fit(stream, epochs=args.epochs, steps_per_epoch=steps, validation_data=test, verbose=2)
    model.save(os.path.join(args.run_dir, "model.keras"))
    loss, accuracy = model.evaluate(test, verbose=0)
    print(f"test accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
