"""The Keras API: your own training script gets what `hvdtrain train` has, from the same code (hvdtrain.session).

    import hvdtrain.keras as hk
    world = hk.init(seed=1)                                   # Horovod started, GPU pinned, tuned comm settings
    run = hk.Run("runs/mine", world, epochs=10, steps_per_epoch=steps, global_batch_size=64)
    model.compile(hk.distribute(keras.optimizers.SGD(0.05)), loss, metrics, jit_compile=False)
    run.resume(model)                                         # the latest checkpoint, if any: where to continue
    run.fit(model, epoch_batches, evaluate=test_batches)      # model.fit from there to the end, in true epochs
    summary = run.finish(model)                               # summary.json with weights_sha256

`run.fit` runs model.fit as `hvdtrain train` does (session.fit_segments: the rest of an interrupted epoch, then
whole epochs) with the broadcast, metric averaging, atomic checkpoints, the agreed stop on SIGUSR1/SIGTERM
(then a checkpoint; exit 0 and the batch script requeues), the agreed non-finite stop, the stall watchdog, exact
evaluation, rank-0 progress, CSV and TensorBoard. Without a run directory, `hk.callbacks(world)` gives just the
broadcast and metric averaging. Data: `hk.shard`, `hk.shard_files`, `hk.agreed_steps`. Speed: on Keras 3,
`hk.fuse_batch_norm(model)` trains BatchNormalization layers with TensorFlow's fused kernel, as Keras 2 did.
"""
from __future__ import annotations

from hvdtrain import runtime

runtime.import_tensorflow()   # first, so TensorFlow's start-up banners stay hidden in your script's output too

from hvdtrain import callbacks as cb  # noqa: E402
from hvdtrain import backend, checkpoint  # noqa: E402
from hvdtrain import world as worlds  # noqa: E402
from hvdtrain.checkpoint import Position  # noqa: E402
from hvdtrain.config import RuntimeConfig  # noqa: E402
from hvdtrain.fused_norm import fuse_batch_norm  # noqa: E402
from hvdtrain.optim import scaled_lr  # noqa: E402
from hvdtrain.rundir import STOP_FILE, RunDir  # noqa: E402
from hvdtrain.session import Session, fit_segments  # noqa: E402
from hvdtrain.tasks import Task  # noqa: E402
from hvdtrain.world import World  # noqa: E402

__all__ = ["Position", "Run", "World", "agreed_steps", "barrier", "callbacks", "distribute", "evaluate", "fuse_batch_norm",
           "init", "predict", "scale_lr", "shard", "shard_files", "verbose"]


def init(**runtime) -> World:
    """Start this rank (see hvdtrain.world.start). Keyword arguments are runtime.* settings: seed, deterministic,
    precision, intra_op_threads, cycle_time_ms, stall_timeout_s, ..."""
    return worlds.start(RuntimeConfig(**runtime))


def distribute(optimizer, *, fp16_compression: bool = False, backward_passes_per_step: int = 1,
               sparse_as_dense: bool = False, bucket_mb: float = 0.0):
    """The optimizer, averaging gradients over all ranks with a fused ring all-reduce; use the returned object.
    Under the mixed_float16 policy it is also loss-scaled, with the skip-a-step decision agreed by all ranks."""
    import keras
    optimizer = backend.distributed_optimizer(optimizer, fp16_compression=fp16_compression,
                                           backward_passes_per_step=backward_passes_per_step,
                                           sparse_as_dense=sparse_as_dense, bucket_mb=bucket_mb)
    if keras.mixed_precision.global_policy().name == "mixed_float16" and \
            not isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer):
        optimizer = backend.loss_scale(optimizer)
    return optimizer


def scale_lr(lr: float, world: World, rule: str = "linear") -> float:
    """lr scaled by the number of ranks: none, linear (lr*n) or sqrt (lr*sqrt(n))."""
    return scaled_lr(lr, rule, world.size)


def shard(dataset, world: World):
    """This rank's share of a tf.data.Dataset (element i goes to rank i % size). Shard before shuffling."""
    return dataset.shard(world.size, world.rank)


def shard_files(files, world: World, reader=None):
    """This rank's records of a file-based dataset: whole files (round robin over the sorted list) when there are at
    least as many files as ranks, so each rank reads only its own; else every rank reads all and keeps every size-th
    record. `reader` turns a list of files into a dataset (default tf.data.TFRecordDataset)."""
    import tensorflow as tf
    from hvdtrain.data import shard_files as by_file
    files = sorted(str(f) for f in files)
    reader = reader or tf.data.TFRecordDataset
    own = by_file(files, world.rank, world.size)
    return reader(own) if own is not None else reader(files).shard(world.size, world.rank)


def agreed_steps(dataset, world: World, batch_size: int | None = None) -> int:
    """Steps per epoch every rank can run: the MIN over ranks of the batches in this rank's finite dataset (or of
    its elements // batch_size). Uneven shards would otherwise leave a rank waiting in an all-reduce forever."""
    import tensorflow as tf
    count = int(dataset.cardinality())
    if count < 0:   # unknown or infinite: count by reading once
        count = int(dataset.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))
    local = count // batch_size if batch_size else count
    return int(backend.allreduce_min([local], "hvdtrain.keras.agreed_steps")[0])


def barrier(world: World) -> None:
    """Wait until every rank gets here (e.g. after rank 0 prepared files the others read)."""
    backend.barrier()


def callbacks(world: World, average_metrics: bool = True) -> list:
    """Without a run directory: the start check and broadcast of rank 0's state, then metric averaging."""
    out = [cb.StartCheck(world)]
    if average_metrics:
        out.append(cb.MetricAverage(world))
    return out


def verbose(world: World) -> int:
    """Keras `verbose` value: progress on rank 0 only."""
    return 2 if world.is_chief else 0


def evaluate(model, dataset, world: World, task: str = "classification") -> dict:
    """Exact metrics over all ranks' batches of `dataset` (this rank's): every batch's sums are gathered and added
    in batch order, rank r's k-th batch counting as batch r + k*size, never per-rank means averaged. Bit for bit
    one process's result when each rank passes whole batches of the one-process data dealt in turn,
    `dataset.batch(B).shard(world.size, world.rank)`; other shares (e.g. `hk.shard(...).batch(B)`) compute
    examples in other batches, which on some CPUs changes float32 outputs in their last bits: the loss then agrees
    within 1e-6 (relative) and the counts unless an example is a near-tie. The model outputs logits
    (classification, multilabel) or values (regression)."""
    from hvdtrain.inference import exact_metrics
    return exact_metrics(model, dataset, world, Task(task, int(model.output_shape[-1])), "hvdtrain.keras.evaluate")


def predict(model, dataset_or_array, world: World, batch_size: int = 256):
    """Data-parallel model.predict: pass all inputs (unsharded); ranks score whole batches in turn and the outputs
    come back in input order, every input exactly once, on every rank (rank 0 included). Bit for bit plain Keras at
    any number of ranks: model.predict(x, batch_size=batch_size) for an array or an unbatched dataset,
    model.predict(dataset) for a batched one (its own batches; batch_size is not used)."""
    from hvdtrain.inference import predict_ordered
    return predict_ordered(model, dataset_or_array, world, batch_size)


class Run:
    """Your script's training run in a run directory: resume, the reliability callbacks, the finish. Collectives
    happen in `__init__`, `resume`, `finish` and inside fit: call them on every rank, in the same order."""

    def __init__(self, run_dir, world: World, *, epochs: int, steps_per_epoch: int, global_batch_size: int,
                 check_every_steps: int = cb.Options.check_every_steps,
                 checkpoint_every_epochs: int = cb.Options.checkpoint_every_epochs,
                 checkpoint_every_steps: int = cb.Options.checkpoint_every_steps,
                 keep_checkpoints: int = cb.Options.keep_checkpoints, stall_timeout_s: float = cb.Options.stall_timeout_s,
                 progress: str = cb.Options.progress, tensorboard: bool = cb.Options.tensorboard,
                 handle_signals: bool = True):
        self.world, self.steps_per_epoch, self._evaluate = world, steps_per_epoch, None
        self.run = RunDir(run_dir)
        backend.agree_on_errors(self.run.check, "hvdtrain.keras.run_dir")
        stop = cb.StopRequest(stop_file=self.run / STOP_FILE)
        if handle_signals:
            stop.install()
        opts = cb.Options(check_every_steps=check_every_steps, checkpoint_every_epochs=checkpoint_every_epochs,
                          checkpoint_every_steps=checkpoint_every_steps, keep_checkpoints=keep_checkpoints,
                          stall_timeout_s=stall_timeout_s, progress=progress, tensorboard=tensorboard)
        self.session = Session(world, self.run, steps_per_epoch=steps_per_epoch, epochs=epochs,
                               global_batch=global_batch_size, options=opts, stop=stop, meta={})

    def resume(self, model, mode: str = "auto") -> Position:
        """Restore the latest checkpoint (weights, optimizer, position) if there is one; every rank the same one."""
        sig = checkpoint.signature(model, tuple(model.input_shape[1:]), int(model.output_shape[-1]), model.name)
        call = (lambda: self.session.resume(model, sig, mode))
        return backend.agree_on_errors(call, "hvdtrain.keras.resume")

    def fit(self, model, epoch_batches, evaluate=None, task: str = "classification", callbacks=(), **fit_kwargs):
        """model.fit from the resume position to the end, with all the callbacks in their order, as `hvdtrain train`
        fits: the rest of an interrupted epoch, then whole epochs, so epoch ends fall where they would have without
        the stop. `epoch_batches(epoch)` gives this rank's batches of epoch `epoch`, the same ones whenever it is
        asked (seed its shuffle with the epoch). `evaluate`: this rank's batches of a labelled held-out dataset
        (exact metrics at every epoch end, `val_*` in the logs; see `evaluate` for which batches give one process's
        bits). `callbacks` run after hvdtrain's (they see averaged metrics); `fit_kwargs` go to model.fit. A data
        error on one rank stops every rank with its message."""
        self._evaluate = None if evaluate is None else self._exact_metrics(evaluate, task)
        everything = self.session.callbacks(evaluate=self._evaluate) + list(callbacks)
        fit_segments(model, _per_epoch(epoch_batches, self.steps_per_epoch), self.session, everything, **fit_kwargs)

    def _exact_metrics(self, dataset, task: str):
        from hvdtrain.inference import exact_metrics
        return lambda model: exact_metrics(model, dataset, self.world, Task(task, int(model.output_shape[-1])),
                                           "hvdtrain.keras.val", "held-out data")

    @property
    def stopped(self) -> bool:
        return self.session.status == "stopped"

    def finish(self, model, export: bool = True) -> dict:
        """Checkpoint, replica check, summary.json (rank 0), model.keras when complete; returns the summary."""
        summary = self.session.finish(model, self._evaluate)
        if export and self.world.is_chief and summary["status"] == "completed":
            self.run.export_model(model)
        return summary


def _per_epoch(epoch_batches, steps: int):
    """The session's `batches_from(first_epoch, epochs, skip)` from a function giving one epoch's batches."""
    def batches_from(first_epoch: int, epochs: int, skip: int):
        stream = epoch_batches(first_epoch).take(steps).skip(skip)
        for epoch in range(first_epoch + 1, epochs):
            stream = stream.concatenate(epoch_batches(epoch).take(steps))
        return stream
    return batches_from
