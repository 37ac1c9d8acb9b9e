"""A plain Keras script trained with split layers (tensor parallelism, Megatron-LM's) by hvdtrain.keras: each tensor
group of T consecutive ranks holds one copy of a small transformer, its attention split by heads and its MLP by
columns then rows; the ranks are D = ranks / T replicas. Checkpoints (slice by slice), resume, the agreed stop and
exact evaluation as in examples/keras_resumable.py; model.keras is the whole model, plain Keras. With
--tensor-parallel 1 the same script trains data-parallel, on the same global batches, to the same model within
float32 rounding (tests/parallel/test_keras_api_tensor.py checks both). Keras 3.

    scripts/launch.sh 2 python examples/keras_tensor.py --run-dir runs/tensor --tensor-parallel 2
"""
import argparse

import hvdtrain.keras as hk
import keras
import numpy as np
import tensorflow as tf


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="checkpoints, metrics.csv, summary.json and model.keras go here")
    p.add_argument("--tensor-parallel", type=int, default=2, help="T: ranks that split each split layer (1: none)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--global-batch", type=int, default=64, help="examples per step over all replicas")
    p.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    p.add_argument("--seed", type=int, default=7)
    return p.parse_args(argv)


def digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    x, y = (d.images / 16.0).reshape(-1, 64).astype(np.float32), d.target.astype(np.int64)
    return (x[:1437], y[:1437]), (x[1437:], y[1437:])


def transformer(seed: int, width: int = 32):
    """Each image's 8 rows as 8 tokens, one encoder block (4 heads, an MLP of 2 x width), the tokens to the classes."""
    keras.utils.set_random_seed(seed)   # every rank builds the same whole model: its slices start from its weights
    L = keras.layers
    x = keras.Input((64,))
    tokens = L.Reshape((8, 8))(x)
    h = L.EinsumDense("btc,cd->btd", output_shape=(8, width), bias_axes="td", name="embed")(tokens)
    h = L.LayerNormalization(name="norm1")(L.Add()([h, L.MultiHeadAttention(4, width // 4, name="attention")(h, h)]))
    mlp = L.Dense(width, name="mlp_out")(L.Dense(2 * width, activation="gelu", name="mlp_in")(h))
    h = L.LayerNormalization(name="norm2")(L.Add()([h, mlp]))
    return keras.Model(x, L.Dense(10, name="logits")(L.Flatten()(h)), name="digits_transformer")


def data(world, global_batch: int):
    """(epoch -> this replica's batches, agreed steps per epoch, this replica's dealt test batches)."""
    (x, y), (x_test, y_test) = digits()
    batch = global_batch // world.replicas   # the ranks of a tensor group all read their replica's batches
    examples = tf.data.Dataset.from_tensor_slices((x, y))

    def epoch_batches(epoch):   # shuffled before sharding: global batch k holds the same examples at any D
        shuffled = examples.shuffle(len(x), seed=epoch, reshuffle_each_iteration=False)
        return hk.shard(shuffled, world).batch(batch, drop_remainder=True)
    steps = hk.agreed_steps(hk.shard(examples, world), world, batch_size=batch)
    test = hk.shard(tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(256), world)   # whole batches dealt
    return epoch_batches, steps, test


def train(run_dir, world, *, epochs: int, global_batch: int, seed: int, optimizer: str = "adam", plan=None,
          callbacks=()) -> dict:
    """Data, run, model (this rank's tensor-parallel model of it when T > 1), resume, fit, finish: the summary."""
    epoch_batches, steps, test = data(world, global_batch)
    run = hk.Run(run_dir, world, epochs=epochs, steps_per_epoch=steps, global_batch_size=global_batch,
                 tensorboard=False)
    model = transformer(seed)
    if world.tensor > 1:
        model = hk.tensor_parallel(model, run, plan=plan)   # this rank's slices of the split layers
    base = keras.optimizers.Adam(1e-3) if optimizer == "adam" else keras.optimizers.SGD(0.01, momentum=0.9)
    model.compile(hk.distribute(base, world=world), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")], jit_compile=False)
    run.resume(model)
    run.fit(model, epoch_batches, evaluate=test, callbacks=callbacks)
    return run.finish(model)


def main(argv=None) -> dict:
    args = parse_args(argv)
    world = hk.init(seed=args.seed, deterministic=True, tensor_parallel=args.tensor_parallel)
    summary = train(args.run_dir, world, epochs=args.epochs, global_batch=args.global_batch, seed=args.seed,
                    optimizer=args.optimizer)
    if world.is_chief and summary["status"] == "completed":
        print(f"test accuracy {summary['test_accuracy']:.4f}; the whole model: {args.run_dir}/model.keras")
    return summary


if __name__ == "__main__":
    main()
