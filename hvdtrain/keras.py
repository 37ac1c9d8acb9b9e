"""The Keras API: your own training script gets what `hvdtrain train` has, from the same code (hvdtrain.session).

    import hvdtrain.keras as hk
    world = hk.init(seed=1)                                   # Horovod started, GPU pinned, tuned comm settings
    run = hk.Run("runs/mine", world, epochs=10, steps_per_epoch=steps, global_batch_size=64)
    model.compile(hk.distribute(keras.optimizers.SGD(0.05)), loss, metrics, jit_compile=False)
    run.resume(model)                                         # the latest checkpoint, if any: where to continue
    run.fit(model, epoch_batches, evaluate=test_batches)      # model.fit from there to the end, in true epochs
    summary = run.finish(model)                               # summary.json with weights_sha256

`run.fit` runs model.fit as `hvdtrain train` does (loop.fit.fit_segments: the rest of an interrupted epoch, then
whole epochs) with the broadcast, metric averaging, atomic checkpoints, the agreed stop on SIGUSR1/SIGTERM
(then a checkpoint; exit 0 and the batch script requeues), the agreed non-finite stop, the stall watchdog, exact
evaluation, rank-0 progress, CSV and TensorBoard. Without a run directory, `hk.callbacks(world)` gives just the
broadcast and metric averaging. Data: `hk.shard`, `hk.shard_files`, `hk.agreed_steps`. Speed: on Keras 3,
`hk.fuse_batch_norm(model)` trains BatchNormalization layers with TensorFlow's fused kernel, as Keras 2 did.

Pipeline stages (Keras 3, MPI launch), as `hvdtrain train --parallel.pipeline_stages=P` trains them: every rank
builds the same whole model and trains its stage; the ranks are D = ranks / P replicas of the pipeline.

    world = hk.init(seed=1, pipeline_stages=2)                # a replica's stages all read the replica's batches
    run = hk.Run("runs/mine", world, epochs=10, steps_per_epoch=steps, global_batch_size=64)
    stage = hk.pipeline(model, run, loss=loss, metrics=metrics, microbatches=4)   # this rank's stage, a keras.Model
    stage.compile(hk.distribute(keras.optimizers.SGD(0.05), world=world), jit_compile=False)
    run.resume(stage); run.fit(stage, epoch_batches, evaluate=test_batches)   # checkpoints stage by stage
    summary = run.finish(stage)                               # model.keras: the whole model, plain Keras

Tensor parallelism (Keras 3), as `hvdtrain train --parallel.tensor_parallel=T` splits layers: every rank builds the
same whole model; each tensor group of T consecutive ranks holds one copy, its split layers divided among them.

    world = hk.init(seed=1, tensor_parallel=2)                # a tensor group's ranks all read the replica's batches
    run = hk.Run("runs/mine", world, epochs=10, steps_per_epoch=steps, global_batch_size=64)
    split = hk.tensor_parallel(model, run)                    # this rank's slices of the split layers, a keras.Model
    split.compile(hk.distribute(keras.optimizers.Adam(1e-3), world=world), loss, metrics, jit_compile=False)
    run.resume(split); run.fit(split, epoch_batches, evaluate=test_batches)   # checkpoints slice by slice
    summary = run.finish(split)                               # model.keras: the whole model, plain Keras
"""
from __future__ import annotations

from hvdtrain import runtime

runtime.import_tensorflow()   # first, so TensorFlow's start-up banners stay hidden in your script's output too

from hvdtrain import backend, checkpoint, config, strategies  # noqa: E402
from hvdtrain import world as worlds  # noqa: E402
from hvdtrain.checkpoint import Position  # noqa: E402
from hvdtrain.config import ParallelConfig, RuntimeConfig  # noqa: E402
from hvdtrain.errors import UserError  # noqa: E402
from hvdtrain.fused_norm import fuse_batch_norm  # noqa: E402
from hvdtrain.loop.averages import MetricAverage  # noqa: E402
from hvdtrain.loop.progress import Options  # noqa: E402
from hvdtrain.loop.stop import StopRequest  # noqa: E402
from hvdtrain.optim import scaled_lr  # noqa: E402
from hvdtrain.rundir import STOP_FILE, RunDir  # noqa: E402
from hvdtrain.session import Session  # noqa: E402
from hvdtrain.tasks import Task  # noqa: E402
from hvdtrain.world import World  # noqa: E402

__all__ = ["Position", "Run", "World", "agreed_steps", "barrier", "callbacks", "distribute", "evaluate", "fuse_batch_norm",
           "init", "pipeline", "predict", "scale_lr", "shard", "shard_files", "tensor_parallel", "verbose"]


def init(pipeline_stages: int = 1, tensor_parallel: int = 1, **runtime) -> World:
    """Start this rank (see hvdtrain.world.start). Keyword arguments are runtime.* settings: seed, deterministic,
    precision, intra_op_threads, cycle_time_ms, stall_timeout_s, ... `pipeline_stages` P > 1: the ranks are
    D = ranks / P replicas of a P-stage pipeline (see `pipeline`); MPI launch and float32 only, as on the CLI.
    `tensor_parallel` T > 1: split layers over T consecutive ranks (see `tensor_parallel`); float32 only; the ranks
    are D = ranks / (P x T) replicas."""
    runtime_cfg = RuntimeConfig(**runtime)
    parallel = _parallel(pipeline_stages=pipeline_stages, tensor_parallel=tensor_parallel)
    config.Config(parallel=parallel, runtime=runtime_cfg)   # the CLI's checks
    return worlds.start(runtime_cfg, stages=pipeline_stages, tensor=tensor_parallel)


def _parallel(**settings) -> ParallelConfig:
    """parallel.* settings, each checked as the CLI checks it (one-line errors)."""
    return config.from_dict({"parallel": settings}).parallel


def distribute(optimizer, *, world: World | None = None, fp16_compression: bool = False,
               backward_passes_per_step: int = 1, sparse_as_dense: bool = False, bucket_mb: float = 0.0,
               shard_state: int = 0):
    """The optimizer, averaging gradients over all ranks with a fused ring all-reduce; use the returned object.
    Under the mixed_float16 policy it is also loss-scaled, with the skip-a-step decision agreed by all ranks.
    `world`: needed for a pipeline's stage (hk.init(pipeline_stages=P)) and a tensor-parallel model
    (hk.init(tensor_parallel=T)), whose gradients are averaged over the D replicas of their part only. `shard_state`
    1 or 2 (ZeRO, the CLI's parallel.shard_state): each replica holds its range of the optimizer state (and at 2 of
    the averaged gradients); `Run` checkpoints and resumes it."""
    import keras
    group = world.replica_group if world is not None else None
    settings = _parallel(shard_state=shard_state)   # the CLI's check of the value
    if settings.shard_state:
        optimizer = backend.sharded_optimizer(optimizer, stage=settings.shard_state, fp16_compression=fp16_compression,
                                              backward_passes_per_step=backward_passes_per_step, group=group)
    else:
        optimizer = backend.distributed_optimizer(optimizer, fp16_compression=fp16_compression,
                                                  backward_passes_per_step=backward_passes_per_step,
                                                  sparse_as_dense=sparse_as_dense, bucket_mb=bucket_mb, group=group)
    if keras.mixed_precision.global_policy().name == "mixed_float16" and \
            not isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer):
        optimizer = backend.loss_scale(optimizer)
    return optimizer


def scale_lr(lr: float, world: World, rule: str = "linear") -> float:
    """lr scaled by the number of replicas (the ranks; a pipelined or tensor-parallel world's D replicas): none,
    linear (lr*n) or sqrt (lr*sqrt(n))."""
    return scaled_lr(lr, rule, world.replicas)


def shard(dataset, world: World):
    """This rank's share of a tf.data.Dataset (element i goes to rank i % size; in a pipelined or tensor-parallel
    world to replica i % D, all of whose ranks read it). Shard before shuffling."""
    view = world.data_view()
    return dataset.shard(view.size, view.rank)


def shard_files(files, world: World, reader=None):
    """This rank's records of a file-based dataset: whole files (round robin over the sorted list) when there are at
    least as many files as ranks, so each rank reads only its own; else every rank reads all and keeps every size-th
    record. `reader` turns a list of files into a dataset (default tf.data.TFRecordDataset). In a pipelined or
    tensor-parallel world the shares are the replicas', as in `shard`."""
    import tensorflow as tf
    from hvdtrain.data import shard_files as by_file
    files = sorted(str(f) for f in files)
    reader = reader or tf.data.TFRecordDataset
    view = world.data_view()
    own = by_file(files, view.rank, view.size)
    return reader(own) if own is not None else reader(files).shard(view.size, view.rank)


def agreed_steps(dataset, world: World, batch_size: int | None = None) -> int:
    """Steps per epoch every rank can run: the MIN over ranks of the batches in this rank's finite dataset (or of
    its elements // batch_size, the per-rank batch: global batch // world.replicas). Uneven shards would otherwise
    leave a rank waiting in an all-reduce forever."""
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
    import keras

    class Start(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            strategies.DataParallel(world).start(self.model)
    averages = MetricAverage(world)
    return [Start()] + ([keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: averages.average(logs))]
                        if average_metrics else [])


def verbose(world: World) -> int:
    """Keras `verbose` value: progress on rank 0 only."""
    return 2 if world.is_chief else 0


def evaluate(model, dataset, world: World, task: str = "classification") -> dict:
    """Exact metrics over all ranks' batches of `dataset` (this rank's): every batch's sums are gathered and added
    in batch order, rank r's k-th batch counting as batch r + k*size, never per-rank means averaged. Bit for bit
    one process's result when each rank passes whole batches of the one-process data dealt in turn,
    `hk.shard(dataset.batch(B), world)`; other shares (e.g. `hk.shard(...).batch(B)`) compute examples in other
    batches, which on some CPUs changes float32 outputs in their last bits: the loss then agrees within 1e-6
    (relative) and the counts unless an example is a near-tie. The model outputs logits (classification,
    multilabel) or values (regression). A pipeline's stage (from `pipeline`) is evaluated through the stages: the
    whole model's metrics, the same bits; there the ranks (replicas) are dealt batches as in `shard`."""
    return _exact_metrics(model, dataset, world, task, "hvdtrain.keras.evaluate")


def predict(model, dataset_or_array, world: World, batch_size: int = 256):
    """Data-parallel model.predict: pass all inputs (unsharded); ranks score whole batches in turn and the outputs
    come back in input order, every input exactly once, on every rank (rank 0 included). Bit for bit plain Keras at
    any number of ranks: model.predict(x, batch_size=batch_size) for an array or an unbatched dataset,
    model.predict(dataset) for a batched one (its own batches; batch_size is not used). Not in a pipelined world."""
    return strategies.for_model(model, world).predict_arrays(model, dataset_or_array, batch_size)


def tensor_parallel(model, run: "Run", *, plan=None):
    """This rank's tensor-parallel model of `model` (a keras.Model whose split layers hold this rank's slices of
    `model`'s weights), in a world from hk.init(tensor_parallel=T); compile it with hk.distribute(optimizer,
    world=world). Every rank passes the same whole model (built alike: same seed), so every slice starts from it.
    `plan`: {layer name: column | row | heads | vocab}, checked as the CLI's parallel.tensor_plan (empty: every
    Dense -> Dense pair and MultiHeadAttention whose sizes T divides). Checkpoints hold each slice; a resume into
    another layout is refused; run.finish writes the whole model as model.keras (on rank 0, `model` itself then
    holds the trained weights)."""
    world = run.world

    def build():
        settings = _parallel(tensor_parallel=world.tensor, tensor_plan=dict(plan or {}))
        strategy = strategies.Tensor(world, settings.tensor_plan, stage_only=False)
        return strategy, strategy.prepare(model, objective=None)
    strategy, split = backend.agree_on_errors(build, "hvdtrain.keras.tensor_parallel")
    run.train_with(strategy, _signature(model))
    return split


def pipeline(model, run: "Run", *, loss, metrics=(), microbatches: int = ParallelConfig.microbatches,
             schedule: str = ParallelConfig.schedule, split=(), balance: str = ParallelConfig.balance,
             tensor_plan=None):
    """This rank's stage of `model` (a keras.Model whose train step runs the pipeline schedule), in a world from
    hk.init(pipeline_stages=P); compile it with hk.distribute(optimizer, world=world). Every rank passes the same
    whole model (built alike: same seed). `loss` (a keras.losses.Loss) and `metrics` (keras.metrics.Metric objects)
    are the last stage's; every stage logs them. The settings and their checks are the CLI's parallel.*:
    `microbatches` per replica batch, `schedule` 1f1b | gpipe, `split` the names of the layers stages 2..P begin at
    (empty: balanced by `balance`, time | params). A resumed run keeps its checkpoint's split; run.finish writes the
    whole model as model.keras (on rank 0, `model` itself then holds every stage's trained weights). In a world
    with tensor_parallel T > 1 the stages' layers are split first (`tensor_plan`, as in `tensor_parallel`)."""
    world = run.world

    def build():
        settings = _parallel(pipeline_stages=world.stages, microbatches=microbatches, schedule=schedule,
                             split=list(split or ()), balance=balance, tensor_parallel=world.tensor,
                             tensor_plan=dict(tensor_plan or {}))
        strategy = strategies.Pipeline(world, settings, run.session.global_batch, run.run)
        return strategy, strategy.prepare(model, _objective(loss, metrics))
    strategy, stage = backend.agree_on_errors(build, "hvdtrain.keras.pipeline")
    run.train_with(strategy, _signature(model))   # checkpoints hold its stages; a resume into another layout is refused
    return stage


def _objective(loss, metrics) -> Task:
    """The loss and metrics as a pipeline's last stage takes them. Objects only: a function's per-example losses
    would be summed, not averaged, and what a metric's name means depends on outputs a stage does not have."""
    import keras
    if not isinstance(loss, keras.losses.Loss):
        raise UserError(f"hvdtrain.keras.pipeline takes a keras.losses.Loss object (e.g. keras.losses."
                        f"SparseCategoricalCrossentropy(from_logits=True)), got {loss!r}", agreed=True)
    names = [m for m in metrics if not isinstance(m, keras.metrics.Metric)]
    if names:
        raise UserError(f"hvdtrain.keras.pipeline takes keras.metrics.Metric objects (e.g. keras.metrics."
                        f"SparseCategoricalAccuracy(name='accuracy')), got {names[0]!r}", agreed=True)
    return _Objective(loss, list(metrics))


class _Objective:
    def __init__(self, loss, metrics):
        self._loss, self._metrics = loss, metrics

    def loss(self):
        return self._loss

    def metrics(self):
        return self._metrics


def _signature(model) -> dict:
    return checkpoint.signature(model, tuple(model.input_shape[1:]), int(model.output_shape[-1]), model.name)


def _exact_metrics(model, dataset, world: World, task: str, name: str) -> dict:
    """The whole model's exact metrics: data-parallel, or through the stages for a pipeline's stage."""
    strategy = strategies.for_model(model, world)
    return strategy.exact_metrics(model, dataset, Task(task, strategy.outputs(model)), name, "held-out data")


class Run:
    """Your script's training run in a run directory: resume, the reliability callbacks, the finish. Collectives
    happen in `__init__`, `resume`, `finish` and inside fit: call them on every rank, in the same order. `model` is
    a Keras model, or in a pipelined world the stage `pipeline` returned."""

    def __init__(self, run_dir, world: World, *, epochs: int, steps_per_epoch: int, global_batch_size: int,
                 check_every_steps: int = Options.check_every_steps,
                 checkpoint_every_epochs: int = Options.checkpoint_every_epochs,
                 checkpoint_every_steps: int = Options.checkpoint_every_steps,
                 keep_checkpoints: int = Options.keep_checkpoints, stall_timeout_s: float = Options.stall_timeout_s,
                 progress: str = Options.progress, tensorboard: bool = Options.tensorboard,
                 handle_signals: bool = True):
        self.world, self.steps_per_epoch, self._evaluate = world, steps_per_epoch, None
        self.run = RunDir(run_dir)
        backend.agree_on_errors(self.run.check, "hvdtrain.keras.run_dir")
        stop = StopRequest(stop_file=self.run / STOP_FILE)
        if handle_signals:
            stop.install()
        opts = Options(check_every_steps=check_every_steps, checkpoint_every_epochs=checkpoint_every_epochs,
                       checkpoint_every_steps=checkpoint_every_steps, keep_checkpoints=keep_checkpoints,
                       stall_timeout_s=stall_timeout_s, progress=progress, tensorboard=tensorboard)
        self.session = Session(world, self.run, strategies.for_world(world), steps_per_epoch=steps_per_epoch,
                               epochs=epochs, global_batch=global_batch_size, options=opts, stop=stop, meta={})
        self._whole = None   # the whole model's signature, when this run trains a pipeline's stage

    @property
    def strategy(self):
        return self.session.strategy

    def train_with(self, strategy, whole_signature: dict) -> None:
        """Train with `strategy` (hk.pipeline's), whose stages make up a whole model of this signature."""
        self.session.adopt(strategy)
        self._whole = whole_signature

    def resume(self, model, mode: str = "auto") -> Position:
        """Restore the latest checkpoint (weights, optimizer, position) if there is one; every rank the same one.
        A pipeline's checkpoint is restored stage by stage, and only into the same stages. A data-parallel one
        written on another number of ranks, or with its optimizer state sharded otherwise, is re-sharded to this
        run (the batches your epoch_batches gives each rank are yours to keep the same)."""
        self._follow(model)
        signature = (lambda: self._whole or _signature(model))
        return backend.agree_on_errors(lambda: self.session.resume(model, signature(), mode), "hvdtrain.keras.resume")

    def fit(self, model, epoch_batches, evaluate=None, task: str = "classification", callbacks=(), **fit_kwargs):
        """model.fit from the resume position to the end, with all the callbacks in their order, as `hvdtrain train`
        fits: the rest of an interrupted epoch, then whole epochs, so epoch ends fall where they would have without
        the stop. `epoch_batches(epoch)` gives this rank's batches of epoch `epoch`, the same ones whenever it is
        asked (seed its shuffle with the epoch). `evaluate`: this rank's batches of a labelled held-out dataset
        (exact metrics at every epoch end, `val_*` in the logs, through the stages for a pipeline; see `evaluate`
        for which batches give one process's bits). `callbacks` run after hvdtrain's (they see averaged metrics);
        `fit_kwargs` go to model.fit. A data error on one rank stops every rank with its message."""
        self._follow(model)
        self._evaluate = None if evaluate is None else \
            (lambda m: _exact_metrics(m, evaluate, self.world, task, "hvdtrain.keras.val"))
        self.strategy.train(self.session, model, _per_epoch(epoch_batches, self.steps_per_epoch), self._evaluate,
                            callbacks=callbacks, **fit_kwargs)

    def _follow(self, model) -> None:
        """Checkpoint the optimizer as it is sharded (hk.distribute's shard_state)."""
        if getattr(model, "optimizer", None) is not None and self.strategy.follow(model.optimizer):
            self.session.adopt(self.strategy)

    @property
    def stopped(self) -> bool:
        return self.session.status == "stopped"

    def finish(self, model, export: bool = True) -> dict:
        """Checkpoint, replica check, summary.json (rank 0), model.keras when complete (a pipeline's stages put
        back together into the whole model); returns the summary."""
        summary = self.session.finish(model, self._evaluate)
        if export and summary["status"] == "completed":
            whole = self.strategy.whole_model(model)
            if self.world.is_chief:
                self.run.export_model(whole)
        return summary


def _per_epoch(epoch_batches, steps: int):
    """The session's `batches_from(first_epoch, epochs, skip)` from a function giving one epoch's batches."""
    def batches_from(first_epoch: int, epochs: int, skip: int):
        stream = epoch_batches(first_epoch).take(steps).skip(skip)
        for epoch in range(first_epoch + 1, epochs):
            stream = stream.concatenate(epoch_batches(epoch).take(steps))
        return stream
    return batches_from
