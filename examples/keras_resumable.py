"""examples/keras_single_process.py, made data-parallel and safe on a cluster with hvdtrain.keras: checkpoints and
exact resume, preemption (SIGUSR1/SIGTERM: an agreed stop, a checkpoint, exit 0, the batch script requeues), the
agreed non-finite stop, the stall watchdog, agreed step counts on uneven file shards, exact evaluation, rank-0
progress and CSV, summary.json with weights_sha256. docs/keras-script.md shows the diff; a test keeps it true.

    scripts/launch.sh 2 python examples/keras_resumable.py --run-dir runs/mine --epochs 10
    sbatch --nodes=2 --ntasks-per-node=1 slurm/run.sbatch python examples/keras_resumable.py --run-dir $PWD/runs/mine

Run it again after a stop and it continues where it stopped.
"""
import argparse
import glob
import os

import hvdtrain.keras as hk
import keras
import numpy as np
import tensorflow as tf


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="checkpoints, metrics.csv and summary.json go here")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--global-batch", type=int, default=64, help="examples per step over all ranks")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--data", help="directory of training TFRecords (features x: 64 floats, y: int64)")
    p.add_argument("--deterministic", action="store_true", help="bit-for-bit repeatable (CPU)")
    p.add_argument("--stall-timeout", type=float, default=60.0, help="seconds without progress before a rank exits")
    return p.parse_args()


def digits_tfrecords(folder: str, world) -> str:
    """Digits as 3 TFRecord files of different sizes, plus a held-out .npz (written by rank 0, then all go on)."""
    from sklearn.datasets import load_digits
    if world.is_chief and not os.path.exists(os.path.join(folder, "test.npz")):
        os.makedirs(folder, exist_ok=True)
        d = load_digits()
        x, y = (d.images / 16.0).reshape(-1, 64).astype(np.float32), d.target.astype(np.int64)
        for i, (a, b) in enumerate(((0, 700), (700, 1000), (1000, 1437))):   # 700, 300 and 437 examples
            with tf.io.TFRecordWriter(os.path.join(folder, f"part-{i}.tfrecord")) as writer:
                for xi, yi in zip(x[a:b], y[a:b]):
                    writer.write(example(xi, yi))
        np.savez(os.path.join(folder, "test.npz"), x=x[1437:], y=y[1437:])
    hk.barrier(world)
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
    world = hk.init(seed=42, deterministic=args.deterministic)
    data = args.data or digits_tfrecords(os.path.join(args.run_dir, "data"), world)
    batch = args.global_batch // world.size
    records = hk.shard_files(glob.glob(os.path.join(data, "*.tfrecord")), world)
    steps = hk.agreed_steps(records, world, batch_size=batch)

    def epoch_batches(epoch):   # epoch e's batches, the same whenever they are asked for (for an exact resume)
        return records.shuffle(2048, seed=1000 + epoch, reshuffle_each_iteration=False).map(parse) \
            .batch(batch, drop_remainder=True)

    held_out = np.load(os.path.join(data, "test.npz"))
    test = hk.shard(tf.data.Dataset.from_tensor_slices((held_out["x"], held_out["y"])), world).batch(256)

    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(128, activation="relu"),
                              keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)], name="digits_mlp")
    optimizer = hk.distribute(keras.optimizers.SGD(args.lr, momentum=0.9))
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"],
                  jit_compile=False)

    run = hk.Run(args.run_dir, world, epochs=args.epochs, steps_per_epoch=steps, global_batch_size=args.global_batch,
                 stall_timeout_s=args.stall_timeout)
    run.resume(model)
    run.fit(model, epoch_batches, evaluate=test)   # model.fit from the resume position, in true epochs
    summary = run.finish(model)
    if world.is_chief and summary["status"] == "completed":
        print(f"test accuracy {summary['test_accuracy']:.4f}, weights {summary['weights_sha256'][:12]}")


if __name__ == "__main__":
    main()
