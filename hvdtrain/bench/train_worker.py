"""The ranks of `hvdtrain bench train` (single and hvdtrain): train each model on synthetic data and time the steps.

    python -m hvdtrain.bench.train_worker --role single --output part.json [--models mlp,cnn ...]
    horovodrun -np 2 --mpi python -m hvdtrain.bench.train_worker --role hvdtrain --output part.json [--section.key=value]

Rank 0 writes one row per model, and the stack it ran on, to --output. `measure` is shared with the peers,
plain Horovod (hvdtrain/bench/horovod_worker.py) and MultiWorkerMirroredStrategy (hvdtrain/bench/mwms_worker.py),
which bring their own sessions.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field

from hvdtrain.bench import harness, train


def add_arguments(p) -> None:
    p.add_argument("--role", choices=("single", "hvdtrain"), default="hvdtrain",
                   help="single: plain Keras in one process; hvdtrain: one rank of a Horovod launch")
    p.add_argument("--output", required=True, metavar="FILE.json")
    train.add_workload_arguments(p)


def run(args) -> int:
    from hvdtrain.config import load_config
    cfg = load_config(None, args.overrides)
    return measure(args, cfg, HorovodSession(args.role, cfg.runtime), args.role)


class HorovodSession:
    """single: plain Keras in one process, Horovod not started; hvdtrain: hvdtrain's startup, optimizer and check."""
    parts = True   # also time the step without communication and the input pipeline alone
    runtime_overrides: dict = {}   # hvdtrain's runtime settings as configured

    def __init__(self, role: str, runtime_cfg):
        from hvdtrain import backend, world
        self.backend, self.distributed, self.runtime_cfg = backend, role == "hvdtrain", runtime_cfg
        self.world = world.start(runtime_cfg, configure=False) if self.distributed else world.World()

    def scope(self):
        return contextlib.nullcontext()

    def distribute(self, optimizer, optim_cfg):
        if not self.distributed:
            return optimizer
        return self.backend.distributed_optimizer(optimizer, fp16_compression=optim_cfg.fp16_compression,
                                               backward_passes_per_step=optim_cfg.backward_passes_per_step,
                                               sparse_as_dense=optim_cfg.sparse_as_dense,
                                               bucket_mb=self.runtime_cfg.bucket_mb)

    def callbacks(self) -> list:
        from hvdtrain.keras import callbacks   # the start check and broadcast
        return callbacks(self.world, average_metrics=False) if self.distributed else []

    def slowest(self, value: float) -> float:
        return max(self._gathered(value, "hvdtrain.bench.slowest"))

    def total(self, value: float) -> float:
        return sum(self._gathered(value, "hvdtrain.bench.total"))

    def _gathered(self, value: float, name: str) -> list[float]:
        return self.backend.allgather_object(value, name) if self.world.size > 1 else [value]

    def barrier(self) -> None:
        if self.world.size > 1:
            self.backend.barrier()

    def fit(self, model, make, **kwargs):
        model.fit(make(self.world), **kwargs)

    def bucket_layout(self, model) -> str | None:
        """The step's all-reduces, as the positions of the gradients in each ('5,4|3,2,1,0': two buckets)."""
        if not self.distributed:
            return None
        layout = self.backend.gradient_buckets(model.trainable_variables, self.runtime_cfg.bucket_mb)
        return "|".join(",".join(map(str, bucket)) for bucket in layout) if layout else None

    def settings(self) -> dict:
        if not self.distributed:
            return {}
        return {**self.backend.active_comm_settings(), "bucket_mb": self.runtime_cfg.bucket_mb}


def measure(args, cfg, session, impl: str) -> int:
    """Time every model of --models in this rank; rank 0 writes the rows."""
    from hvdtrain import runtime
    runtime_cfg = cfg.replace(runtime={"intra_op_threads": args.threads, **session.runtime_overrides}).runtime
    runtime.configure(runtime_cfg, session.world.local_size)
    rows = [_measure_model(args, cfg, name, session, impl)
            for name in (m.strip() for m in args.models.split(",") if m.strip())]
    if session.world.rank == 0:
        doc = harness.new_document("train", session.world.size, {**session.settings(), "intra_op_threads": args.threads},
                                   harness.rank_stack())
        doc["rows"] = rows
        harness.write_json(args.output, doc)
    return 0


@dataclass
class StepTimer:
    """Time at the end of every batch; the steps after the warm-up are the timed ones."""
    warmup: int
    ends: list = field(default_factory=list)
    epoch_ends: list = field(default_factory=list)    # wall clock, to find the timed steps in a Horovod timeline
    cpu_ends: list = field(default_factory=list)      # this process's CPU time (all threads)

    def callback(self):
        import keras

        def mark(batch, logs):
            self.ends.append(time.perf_counter())
            self.epoch_ends.append(time.time())
            self.cpu_ends.append(time.process_time())
        return keras.callbacks.LambdaCallback(on_train_batch_end=mark)

    def step_seconds(self) -> float:
        return self._per_step(self.ends)

    def cpu_seconds(self) -> float:
        """CPU time this process used per timed step: on a shared machine a setting that spins or polls shows here
        even when the wall clock is too noisy to tell."""
        return self._per_step(self.cpu_ends)

    def _per_step(self, marks: list) -> float:
        timed = marks[self.warmup - 1:]
        return (timed[-1] - timed[0]) / (len(timed) - 1)

    def step_ends_epoch_us(self) -> list[float]:
        """The timed steps' ends, and the end of the step before them, in epoch microseconds."""
        return [t * 1e6 for t in self.epoch_ends[self.warmup - 1:]]


def _measure_model(args, cfg, name: str, session, impl: str) -> dict:
    import keras

    from hvdtrain import data, models, optim
    from hvdtrain.config import DataConfig, ModelConfig
    work, world = train.WORKLOADS[name], session.world
    shape = train.input_shape(work, args.image_size)
    per_rank = args.batch or work.per_rank_batch
    global_batch = per_rank * world.size
    data_cfg = DataConfig(source="synthetic", input_shape=shape, num_classes=work.classes,
                          synthetic_samples=max(work.samples, global_batch))
    steps_total = args.warmup + args.steps
    epochs = 2 + steps_total * global_batch // data_cfg.synthetic_samples
    source = data.open_source(data_cfg)
    steps = source.local_steps(world, global_batch)
    make = lambda w: source.train_batches(w, global_batch, steps, 0, epochs)  # noqa: E731

    def compiled(distributed: bool):
        with session.scope():
            model = models.build_model(ModelConfig(**work.model), shape, work.classes)
            optimizer = optim.build_optimizer(cfg.optim, world.size, 100, epochs)
            if distributed:
                optimizer = session.distribute(optimizer, cfg.optim)
            model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          jit_compile=False)
        return model

    def timed_fit(model, callbacks) -> StepTimer:
        timer = StepTimer(args.warmup)
        session.barrier()
        session.fit(model, make, epochs=1, steps_per_epoch=steps_total, verbose=0,
                    callbacks=[*callbacks, timer.callback()])
        return timer

    model = compiled(True)
    timer = timed_fit(model, session.callbacks())
    step = timer.step_seconds()
    row = {"model": name, "impl": impl, "np": world.size, "params": model.count_params(),
           "input": "x".join(map(str, shape)), "classes": work.classes, "per_rank_batch": per_rank,
           "global_batch": global_batch, "steps": args.steps, "step_ms": step * 1e3,
           "samples_per_sec": global_batch / step, "per_rank_samples_per_sec": per_rank / step,
           "loadavg": harness.loadavg(), "step_ends_epoch_us": timer.step_ends_epoch_us()}
    if session.parts:
        row["cpu_ms_per_step"] = session.total(timer.cpu_seconds()) * 1e3   # all ranks together
        row["bucket_layout"] = session.bucket_layout(model)
        if world.size > 1:   # the same steps without communication, all ranks at once
            local_timer = timed_fit(compiled(False), [])
            local = session.slowest(local_timer.step_seconds())
            row.update(local_step_ms=local * 1e3, comm_share=max(0.0, 1.0 - local / step),
                       local_cpu_ms_per_step=session.total(local_timer.cpu_seconds()) * 1e3)
        pipeline = session.slowest(_pipeline_seconds(make(world), args.warmup, args.steps))
        row["pipeline_samples_per_sec"] = per_rank / pipeline
        row["pipeline_ratio"] = row["pipeline_samples_per_sec"] / (per_rank / step)
    return row


def _pipeline_seconds(dataset, warmup: int, steps: int) -> float:
    """Seconds per batch that tf.data needs on its own."""
    it = iter(dataset)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    return (time.perf_counter() - start) / steps


if __name__ == "__main__":
    sys.exit(harness.worker_main(__doc__, add_arguments, run))
