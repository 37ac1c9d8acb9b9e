"""Rank-side worker of `hvdtrain bench pipeline` (run under horovodrun --mpi by the driver, bench/pipeline.py).

Default: the bubble. A model of P equal blocks, split into P stages; for every schedule and number of micro-batches
M, a fresh stage trained for `--warmup` then `--steps` steps on micro-batches of `--micro-batch` examples (the replica
batch grows with M, the cost of a micro-batch stays fixed). `--cost fixed`: each block holds its thread for
`--forward-ms` in its forward and `--backward-ms` in its backward (a sleep beside a small Dense layer), so every stage
costs exactly that even when ranks share cores: the formula's setting. `--cost dense`: each block is `--layers` Dense
layers of `--width` units computing for real. Each rank measures the seconds it waited for activations and gradients
(its idle time in the schedule) against the wall time of the measured steps. With --throughput instead: the dense
model trained as D x P (1F1B, 4 micro-batches) and data-parallel on all ranks with the same global batch, rounds
alternating. Rank 0 writes every rank's numbers as JSON.
"""
from __future__ import annotations

import json
import time
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--stages", type=int, required=True)
    p.add_argument("--micro", default="1,2,4,8,16", help="numbers of micro-batches, comma-separated")
    p.add_argument("--schedules", default="gpipe,1f1b")
    p.add_argument("--cost", choices=("fixed", "dense"), default="fixed",
                   help="blocks of fixed, known cost (a sleep) or of real Dense compute")
    p.add_argument("--forward-ms", type=float, default=60.0, help="--cost fixed: a block's forward per micro-batch")
    p.add_argument("--backward-ms", type=float, default=120.0, help="--cost fixed: a block's backward per micro-batch")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2, help="Dense layers per stage")
    p.add_argument("--micro-batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="repeat every configuration, taking turns")
    p.add_argument("--throughput", action="store_true",
                   help="instead: samples/s of D x P against data parallelism on the same ranks, rounds alternating")
    p.add_argument("--output", required=True)


def dense_model(stages: int, layers: int, width: int):
    """P blocks of equal, real compute. A per-feature scale in front makes the first block compute its input gradient
    as every later block does (else stage 1 would skip one matmul of its backward and wait for the others)."""
    import keras

    class Scale(keras.layers.Layer):
        def build(self, shape):
            self.w = self.add_weight(shape=(shape[-1],), initializer="ones")

        def call(self, x):
            return x * self.w
    blocks = [keras.layers.Dense(width, activation="relu", name=f"block{s + 1}_dense{i + 1}")
              for s in range(stages) for i in range(layers)]
    return keras.Sequential([keras.Input((width,)), Scale(name="scale"), *blocks, keras.layers.Dense(10, name="head")],
                            name="fixed_cost")


def hold(seconds: float) -> None:
    """Return `seconds` from now, precisely: sleep until shortly before (a sleep can overrun by a scheduler tick on
    a busy machine), then poll the clock for the rest."""
    deadline = time.perf_counter() + seconds
    time.sleep(max(0.0, seconds - 1e-3))
    while time.perf_counter() < deadline:
        pass


def held_model(stages: int, width: int, forward_ms: float, backward_ms: float):
    """P blocks of a known cost: a Dense layer (its weights give the stage something to update), then a hold of
    forward_ms in the forward and backward_ms in the backward. The hold sleeps, so it costs the same wall time
    whatever else runs on the machine; it comes after the Dense, so every stage's backward runs it."""
    import keras
    import tensorflow as tf

    def held(t, seconds):
        out = tf.numpy_function(lambda a: (hold(seconds), a)[1], [t], t.dtype, stateful=True)
        out.set_shape(t.shape)
        return out

    class Hold(keras.layers.Layer):
        def call(self, x):
            @tf.custom_gradient
            def hold(x):
                return held(x, forward_ms / 1e3), lambda dy: held(dy, backward_ms / 1e3)
            return hold(x)
    blocks = [layer for s in range(stages) for layer in (keras.layers.Dense(width, name=f"block{s + 1}_dense1"),
                                                         Hold(name=f"block{s + 1}_hold"))]
    return keras.Sequential([keras.Input((width,)), *blocks, keras.layers.Dense(10, name="head")], name="held")


class Timer:
    """The schedule's span in each step: every stage starts it together (a barrier, so a stage's wait for the first
    activation is the bubble and not the previous step's optimizer update), and it ends after the stage's last pass.
    A stage's busy time is its span less the seconds it spent receiving; its idle share is measured against the
    pipeline's makespan, the longest span (the bubble formula's denominator)."""

    def __init__(self, channel):
        self.channel, self.spans, self.waited, self.sent, self.steps = channel, 0.0, 0.0, 0, 0
        self.before = None

    def start(self):
        barrier = self.channel.comm.Ibarrier()
        while not barrier.Test():   # without spinning, which would take the core of a stage still computing
            time.sleep(50e-6)
        self.channel.waited = 0.0
        self.before = _p2p_bytes()
        self.started = time.perf_counter()

    def end(self):
        self.spans += time.perf_counter() - self.started
        self.waited += self.channel.waited
        self.sent += _p2p_bytes() - self.before
        self.steps += 1


def _p2p_bytes() -> int:
    """The bytes this rank has sent point-to-point so far (counted where they are sent)."""
    from hvdtrain import backend
    return sum(backend.sent_bytes().get("activations", {}).values())


def _allreduced_bytes() -> int:
    from hvdtrain import backend
    return sum(backend.sent_bytes().get("gradients", {}).values())


def run(args) -> int:
    from hvdtrain import backend
    from hvdtrain import world as worlds
    from hvdtrain.backend.p2p import Channel
    from hvdtrain.config import RuntimeConfig
    from hvdtrain.pipeline import split
    # One thread per rank for ops: a stage is then one sequential processor, as the bubble formula assumes.
    world = worlds.start(RuntimeConfig(intra_op_threads=1, inter_op_threads=1), stages=args.stages)
    if args.cost == "fixed" and not args.throughput:
        whole = held_model(args.stages, args.width, args.forward_ms, args.backward_ms)
    else:
        whole = dense_model(args.stages, args.layers, args.width)
    plan, stage_models = split.plan(whole, args.stages, tuple(f"block{s + 1}_dense1" for s in range(1, args.stages)))
    channel = Channel()
    if args.throughput:
        rows = [{**fn(args, world, channel, stage_models[world.stage], whole), "round": round_}
                for round_ in range(args.rounds) for fn in (pipelined_throughput, data_parallel_throughput)]
    else:
        configs = [(s, int(m)) for s in args.schedules.split(",") for m in args.micro.split(",")]
        rows = [{**measure(stage_models[world.stage], world, channel, args, schedule, micro), "round": round_}
                for round_ in range(args.rounds) for schedule, micro in configs]
    every = backend.allgather_object(rows, "bench.pipeline.rows")
    if world.rank == 0:
        Path(args.output).write_text(json.dumps({"rows": [r for rank in every for r in rank],
                                                 "whole_param_bytes": 4 * whole.count_params(),
                                                 "plan": plan.describe(), "ranks": world.size, "stages": args.stages,
                                                 "cost": args.cost}))
    return 0


def _data(args, batch: int, seed: int):
    import numpy as np
    import tensorflow as tf
    rng = np.random.default_rng(seed)
    return tf.data.Dataset.from_tensors((rng.standard_normal((batch, args.width)).astype("float32"),
                                         rng.integers(0, 10, batch))).repeat()


def _timed_fit(model, data, args, channel) -> float:
    """Seconds of --steps steps after --warmup, all ranks starting together."""
    model.fit(data, steps_per_epoch=args.warmup, epochs=1, verbose=0)
    channel.comm.Barrier()
    started = time.perf_counter()
    model.fit(data, steps_per_epoch=args.steps, epochs=1, verbose=0)
    return time.perf_counter() - started


def pipelined_throughput(args, world, channel, stage_model, whole) -> dict:
    """D x P with 1F1B and 4 micro-batches: the global batch is D x 4 micro-batches."""
    import keras
    from hvdtrain import backend
    from hvdtrain.pipeline.stage import PipelineStage
    micro = 4
    stage = PipelineStage(stage_model, world, channel, schedule="1f1b", microbatches=micro,
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    stage.compile(optimizer=backend.distributed_optimizer(keras.optimizers.SGD(1e-4), group=world.replica_group),
                  jit_compile=False)
    global_batch = world.replicas * micro * args.micro_batch
    p2p, allreduced = _p2p_bytes(), _allreduced_bytes()
    seconds = _timed_fit(stage, _data(args, micro * args.micro_batch, world.replica), args, channel)
    steps = args.warmup + args.steps
    return {"impl": f"pipeline {world.replicas}x{world.stages}", "rank": world.rank, "global_batch": global_batch,
            "seconds": seconds, "samples": args.steps * global_batch,
            "p2p_bytes_per_step": (_p2p_bytes() - p2p) / steps,
            "allreduce_bytes_per_step": (_allreduced_bytes() - allreduced) / steps}


def data_parallel_throughput(args, world, channel, stage_model, whole) -> dict:
    """The unsplit model on every rank, the same global batch dealt over all of them, gradients averaged over all."""
    import keras
    from hvdtrain import backend
    global_batch = world.replicas * 4 * args.micro_batch
    whole.compile(optimizer=backend.distributed_optimizer(keras.optimizers.SGD(1e-4)), jit_compile=False,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    allreduced = _allreduced_bytes()
    seconds = _timed_fit(whole, _data(args, global_batch // world.size, world.rank), args, channel)
    return {"impl": f"data parallel x{world.size}", "rank": world.rank, "global_batch": global_batch,
            "seconds": seconds, "samples": args.steps * global_batch, "p2p_bytes_per_step": 0,
            "allreduce_bytes_per_step": (_allreduced_bytes() - allreduced) / (args.warmup + args.steps)}


def measure(stage_model, world, channel, args, schedule: str, micro: int) -> dict:
    """One configuration on this rank: a fresh stage, warmed up, then timed over --steps steps."""
    import keras
    import numpy as np
    from hvdtrain import backend
    from hvdtrain.pipeline.stage import PipelineStage
    timer = Timer(channel)
    stage = PipelineStage(stage_model, world, channel, schedule=schedule, microbatches=micro,
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), timer=timer)
    stage.compile(optimizer=backend.distributed_optimizer(keras.optimizers.SGD(1e-4, momentum=0.9),
                                                          group=world.replica_group),
                  jit_compile=False)
    data = _data(args, args.micro_batch * micro, world.replica)
    stage.fit(data, steps_per_epoch=args.warmup, epochs=1, verbose=0)
    timer.__init__(channel)
    started = time.perf_counter()
    stage.fit(data, steps_per_epoch=args.steps, epochs=1, verbose=0)
    wall = time.perf_counter() - started
    slots = [v for v in stage.optimizer.variables if "iteration" not in v.path and "learning_rate" not in v.path]
    return {"schedule": schedule, "micro": micro, "rank": world.rank, "stage": world.stage, "replica": world.replica,
            "busy_ms": 1e3 * (timer.spans - timer.waited) / timer.steps, "schedule_ms": 1e3 * timer.spans / timer.steps,
            "step_ms": 1e3 * wall / args.steps, "p2p_bytes_per_step": timer.sent / timer.steps,
            "stashed_peak": stage.peak_stashed, "param_bytes": 4 * stage_model.count_params(),
            "optimizer_bytes": 4 * sum(int(np.prod(v.shape)) for v in slots)}


if __name__ == "__main__":
    import sys
    from hvdtrain.bench import harness
    sys.exit(harness.worker_main(__doc__, add_arguments, run))
