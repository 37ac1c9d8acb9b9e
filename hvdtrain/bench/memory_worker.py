"""The ranks of `hvdtrain bench memory`: one model trained with Adam at one parallel.shard_state, timed; rank 0
writes every rank's memory entry (the bytes of the variables it holds, as summary.json's `memory`), its peak resident
memory, and the step time.

    horovodrun -np 2 --mpi python -m hvdtrain.bench.memory_worker --model mlp --stage 1 --output part.json
"""
from __future__ import annotations

import math
import resource
import sys

from hvdtrain.bench import harness, train


def add_arguments(p) -> None:
    p.add_argument("--model", choices=("mlp", "resnet50"), required=True)
    p.add_argument("--stage", type=int, choices=(0, 1, 2), required=True, help="parallel.shard_state")
    p.add_argument("--batch", type=int, default=0, help="per-rank batch (0: the model's own in bench train)")
    p.add_argument("--image-size", type=int, default=64, help="resnet50's square images (default 64)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--threads", type=int, default=1, help="TensorFlow intra-op threads per rank (default 1)")
    p.add_argument("--output", required=True, metavar="FILE.json")


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports it in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(args) -> int:
    import keras

    from hvdtrain import backend, data, models, runtime
    from hvdtrain import world as worlds
    from hvdtrain.bench.train_worker import StepTimer
    from hvdtrain.config import DataConfig, ModelConfig, load_config
    from hvdtrain.strategies import DataParallel
    cfg = load_config(None, args.overrides)
    world = worlds.start(cfg.runtime, configure=False)
    runtime.configure(cfg.replace(runtime={"intra_op_threads": args.threads}).runtime, world.local_size)
    work = train.WORKLOADS[args.model]
    shape = train.input_shape(work, args.image_size)
    per_rank = args.batch or work.per_rank_batch
    global_batch, steps = per_rank * world.size, args.warmup + args.steps
    source = data.open_source(DataConfig(source="synthetic", input_shape=shape, num_classes=work.classes,
                                         synthetic_samples=max(work.samples, global_batch)))
    batches = source.train_batches(world, global_batch, source.local_steps(world, global_batch), 0,
                                   2 + steps * global_batch // max(work.samples, global_batch))
    next(iter(batches))
    baseline = peak_rss_bytes()   # TensorFlow, Horovod and the data: what the training adds is measured from here
    strategy = DataParallel(world, args.stage)
    model = models.build_model(ModelConfig(**work.model), shape, work.classes)
    model.compile(strategy.distribute(keras.optimizers.Adam(1e-3)),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
    timer = StepTimer(args.warmup)
    start = keras.callbacks.LambdaCallback(on_train_begin=lambda logs=None: strategy.start(model))
    backend.barrier()
    model.fit(batches, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[start, timer.callback()])
    mine = {**strategy.memory(model), "peak_rss_bytes": peak_rss_bytes(), "baseline_rss_bytes": baseline,
            "step_s": timer.step_seconds()}
    ranks = backend.allgather_object(mine, "hvdtrain.bench.memory")
    if world.rank == 0:
        doc = harness.new_document("memory", world.size, {"intra_op_threads": args.threads}, harness.rank_stack())
        doc["row"] = {"model": args.model, "ranks": world.size, "stage": args.stage,
                      "parameters": sum(math.prod(v.shape) for v in model.trainable_variables),
                      "input": "x".join(map(str, shape)), "per_rank_batch": per_rank,
                      "step_ms": max(r["step_s"] for r in ranks) * 1e3, "per_rank": ranks}
        harness.write_json(args.output, doc)
    return 0


if __name__ == "__main__":
    sys.exit(harness.worker_main(__doc__, add_arguments, run))
