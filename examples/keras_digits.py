"""Your own Keras script, made data-parallel with hvdtrain.keras. Run on 2 local ranks:

    scripts/launch.sh 2 python examples/keras_digits.py --epochs 20

Five lines differ from a single-process script: init, shard, scale_lr + distribute, callbacks, verbose.
(examples/keras_resumable.py adds checkpoints, resume, preemption and the rest of `hvdtrain train`'s safety.)
"""
import argparse

import keras
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import hvdtrain.keras as hk


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=64)
    args = parser.parse_args()

    world = hk.init()                                                   # 1. start Horovod, pin GPU, tuned settings
    digits = load_digits()
    x = (digits.images / 16.0).reshape(-1, 64).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.2, random_state=0,
                                                        stratify=digits.target)
    per_rank = args.global_batch // world.size
    train = hk.shard(tf.data.Dataset.from_tensor_slices((x_train, y_train)), world)   # 2. this rank's share
    train = train.shuffle(2048, seed=world.rank).batch(per_rank, drop_remainder=True).repeat()
    steps = len(x_train) // args.global_batch                           # the same on every rank

    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(128, activation="relu"), keras.layers.Dense(10)])
    optimizer = hk.distribute(keras.optimizers.SGD(hk.scale_lr(0.05, world, "none"), momentum=0.9))  # 3.
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"],
                  jit_compile=False)
    model.fit(train, epochs=args.epochs, steps_per_epoch=steps,
              callbacks=hk.callbacks(world), verbose=hk.verbose(world))  # 4. broadcast + averaging, 5. rank-0 output

    test = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(128).shard(world.size, world.rank)
    metrics = hk.evaluate(model, test, world)       # whole batches dealt in turn: one process's metrics, bit for bit
    if world.is_chief:
        print(f"test accuracy {metrics['accuracy']:.4f} on {metrics['examples']} examples from {world.size} ranks")


if __name__ == "__main__":
    main()
