"""A plain Keras script trained as a pipeline with hvdtrain.keras: the model split into P stages, one per rank of a
pipeline, micro-batches flowing through them (1F1B), the ranks D = ranks / P replicas of the pipeline. Checkpoints,
resume, the agreed stop, exact evaluation through the stages as in examples/keras_resumable.py; model.keras is the
whole model, plain Keras. With --stages 1 the same script trains data-parallel, on the same global batches, to the
same model within float32 rounding (tests/parallel/test_keras_api_pipeline.py checks both). MPI launch, Keras 3.

    scripts/launch.sh 2 python examples/keras_pipeline.py --run-dir runs/pipeline --stages 2
"""
import argparse

import hvdtrain.keras as hk
import keras
import tensorflow as tf


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="checkpoints, metrics.csv, summary.json and model.keras go here")
    p.add_argument("--stages", type=int, default=2, help="pipeline stages P (1: data-parallel)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--global-batch", type=int, default=64, help="examples per step over all replicas")
    p.add_argument("--microbatches", type=int, default=4, help="micro-batches per replica batch")
    p.add_argument("--balance", default="time", help="where to cut: time (measured) | params")
    p.add_argument("--seed", type=int, default=7)
    return p.parse_args(argv)


def digits():
    """hvdtrain's digits split, the one `hvdtrain train` reports its accuracy on (stratified: 1,437 images to train
    on, 360 held out), flattened for this MLP: the accuracy printed at the end compares with the CLI's."""
    from hvdtrain import data
    from hvdtrain.config import DataConfig
    source = data.open_source(DataConfig())
    train, test = source.arrays("train"), source.arrays("test")
    return (train.x.reshape(-1, 64), train.y), (test.x.reshape(-1, 64), test.y)


def mlp(seed: int):
    keras.utils.set_random_seed(seed)   # every rank builds the same whole model: its stages start from its weights
    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, activation="relu", name="hidden"),
                             keras.layers.Dense(32, activation="relu", name="hidden2"),
                             keras.layers.Dense(10, name="logits")], name="digits_mlp")


def objective():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True), \
        [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]


def data(world, global_batch: int):
    """(epoch -> this replica's batches, agreed steps per epoch, this replica's dealt test batches)."""
    (x, y), (x_test, y_test) = digits()
    batch = global_batch // world.replicas   # all stages of a replica read the replica's batches
    examples = tf.data.Dataset.from_tensor_slices((x, y))

    def epoch_batches(epoch):   # shuffled before sharding: global batch k holds the same examples at any D
        shuffled = examples.shuffle(len(x), seed=epoch, reshuffle_each_iteration=False)
        return hk.shard(shuffled, world).batch(batch, drop_remainder=True)
    steps = hk.agreed_steps(hk.shard(examples, world), world, batch_size=batch)
    test = hk.shard(tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(256), world)   # whole batches dealt
    return epoch_batches, steps, test


def train(run_dir, world, *, epochs: int, global_batch: int, seed: int, **pipeline_options) -> dict:
    """Data, run, model (this rank's stage of it in a pipelined world), resume, fit, finish: the summary."""
    epoch_batches, steps, test = data(world, global_batch)
    run = hk.Run(run_dir, world, epochs=epochs, steps_per_epoch=steps, global_batch_size=global_batch,
                 tensorboard=False)
    model, (loss, metrics) = mlp(seed), objective()
    optimizer = hk.distribute(keras.optimizers.SGD(0.05, momentum=0.9), world=world)
    if world.stages > 1:
        model = hk.pipeline(model, run, loss=loss, metrics=metrics, **pipeline_options)
        model.compile(optimizer, jit_compile=False)
    else:
        model.compile(optimizer, loss, metrics=metrics, jit_compile=False)
    run.resume(model)
    run.fit(model, epoch_batches, evaluate=test)
    return run.finish(model)


def main(argv=None) -> dict:
    args = parse_args(argv)
    world = hk.init(seed=args.seed, deterministic=True, pipeline_stages=args.stages)
    options = {"microbatches": args.microbatches, "balance": args.balance} if args.stages > 1 else {}
    summary = train(args.run_dir, world, epochs=args.epochs, global_batch=args.global_batch, seed=args.seed, **options)
    if world.is_chief and summary["status"] == "completed":
        print(f"test accuracy {summary['test_accuracy']:.4f}; the whole model: {args.run_dir}/model.keras")
    return summary


if __name__ == "__main__":
    main()
