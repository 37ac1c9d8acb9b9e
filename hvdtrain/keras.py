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

Pipeline stages (Keras 3, MPI launch), as `hvdtrain train --parallel.pipeline_stages=P` trains them: every rank
builds the same whole model and trains its stage; the ranks are D = ranks / P replicas of the pipeline.

    world = hk.init(seed=1, pipeline_stages=2)                # a replica's stages all read the replica's batches
    run = hk.Run("runs/mine", world, epochs=10, steps_per_epoch=steps, global_batch_size=64)
    stage = hk.pipeline(model, run, loss=loss, metrics=metrics, microbatches=4)   # this rank's stage, a keras.Model
    stage.compile(hk.distribute(keras.optimizers.SGD(0.05), world=world), jit_compile=False)
    run.resume(stage); run.fit(stage, epoch_batches, evaluate=test_batches)   # checkpoints stage by stage
    summary = run.finish(stage)                               # model.keras: the whole model, plain Keras
"""
from __future__ import annotations

import dataclasses

from hvdtrain import runtime

runtime.import_tensorflow()   # first, so TensorFlow's start-up banners stay hidden in your script's output too

from hvdtrain import callbacks as cb  # noqa: E402
from hvdtrain import backend, checkpoint, config  # noqa: E402
from hvdtrain import world as worlds  # noqa: E402
from hvdtrain.checkpoint import Position  # noqa: E402
from hvdtrain.config import ParallelConfig, RuntimeConfig  # noqa: E402
from hvdtrain.errors import UserError  # noqa: E402
from hvdtrain.fused_norm import fuse_batch_norm  # noqa: E402
from hvdtrain.optim import scaled_lr  # noqa: E402
from hvdtrain.rundir import STOP_FILE, RunDir  # noqa: E402
from hvdtrain.session import Session, fit_segments  # noqa: E402
from hvdtrain.tasks import Task  # noqa: E402
from hvdtrain.world import World  # noqa: E402

__all__ = ["Position", "Run", "World", "agreed_steps", "barrier", "callbacks", "distribute", "evaluate", "fuse_batch_norm",
           "init", "pipeline", "predict", "scale_lr", "shard", "shard_files", "verbose"]


def init(pipeline_stages: int = 1, **runtime) -> World:
    """Start this rank (see hvdtrain.world.start). Keyword arguments are runtime.* settings: seed, deterministic,
    precision, intra_op_threads, cycle_time_ms, stall_timeout_s, ... `pipeline_stages` P > 1: the ranks are
    D = ranks / P replicas of a P-stage pipeline (see `pipeline`); MPI launch and float32 only, as on the CLI."""
    runtime_cfg = RuntimeConfig(**runtime)
    _cli_config(runtime_cfg, parallel={"pipeline_stages": pipeline_stages})   # the CLI's checks of the two together
    return worlds.start(runtime_cfg, stages=pipeline_stages)


def _cli_config(runtime_cfg: RuntimeConfig = RuntimeConfig(), **sections) -> config.Config:
    """The config `hvdtrain train` would have with these settings, checked as it checks them (one-line errors)."""
    return dataclasses.replace(config.from_dict(sections), runtime=runtime_cfg)


def distribute(optimizer, *, world: World | None = None, fp16_compression: bool = False,
               backward_passes_per_step: int = 1, sparse_as_dense: bool = False, bucket_mb: float = 0.0):
    """The optimizer, averaging gradients over all ranks with a fused ring all-reduce; use the returned object.
    Under the mixed_float16 policy it is also loss-scaled, with the skip-a-step decision agreed by all ranks.
    `world`: needed for a pipeline's stage (hk.init(pipeline_stages=P)), whose gradients are averaged over the
    stage's D replicas only."""
    import keras
    group = world.replica_group if world is not None else None
    optimizer = backend.distributed_optimizer(optimizer, fp16_compression=fp16_compression,
                                              backward_passes_per_step=backward_passes_per_step,
                                              sparse_as_dense=sparse_as_dense, bucket_mb=bucket_mb, group=group)
    if keras.mixed_precision.global_policy().name == "mixed_float16" and \
            not isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer):
        optimizer = backend.loss_scale(optimizer)
    if not hasattr(optimizer, "_hvdtrain_group"):   # Run.resume checks that a stage's averages over its replicas
        optimizer._hvdtrain_group = group
    return optimizer


def scale_lr(lr: float, world: World, rule: str = "linear") -> float:
    """lr scaled by the number of replicas (the ranks; a pipelined world's D pipelines): none, linear (lr*n) or
    sqrt (lr*sqrt(n))."""
    return scaled_lr(lr, rule, world.replicas)


def shard(dataset, world: World):
    """This rank's share of a tf.data.Dataset (element i goes to rank i % size; in a pipelined world to replica
    i % D, all of whose stages read it). Shard before shuffling."""
    view = world.data_view()
    return dataset.shard(view.size, view.rank)


def shard_files(files, world: World, reader=None):
    """This rank's records of a file-based dataset: whole files (round robin over the sorted list) when there are at
    least as many files as ranks, so each rank reads only its own; else every rank reads all and keeps every size-th
    record. `reader` turns a list of files into a dataset (default tf.data.TFRecordDataset). In a pipelined world
    the shares are the replicas', as in `shard`."""
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
    from hvdtrain.inference import predict_ordered
    if world.stages > 1:
        raise UserError(f"hvdtrain.keras.predict scores with the whole model on every rank, and in this "
                        f"{world.stages}-stage pipeline each rank holds one stage: predict with the whole model "
                        "(model.keras, written by run.finish) in a world without stages", agreed=True)
    return predict_ordered(model, dataset_or_array, world, batch_size)


# ---- pipeline stages -----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Staged:
    """What `pipeline` keeps on the stage it returns, for Run and evaluate."""
    pipeline: object                 # pipeline.Pipeline; on rank 0 with the whole model, for model.keras
    signature: dict                  # the whole model's checkpoint signature, with the stages' layout


def pipeline(model, run: "Run", *, loss, metrics=(), microbatches: int = ParallelConfig.microbatches,
             schedule: str = ParallelConfig.schedule, split=(), balance: str = ParallelConfig.balance):
    """This rank's stage of `model` (a keras.Model whose train step runs the pipeline schedule), in a world from
    hk.init(pipeline_stages=P); compile it with hk.distribute(optimizer, world=world). Every rank passes the same
    whole model (built alike: same seed). `loss` (a keras.losses.Loss) and `metrics` (keras.metrics.Metric objects)
    are the last stage's; every stage logs them. The settings and their checks are the CLI's parallel.*:
    `microbatches` per replica batch, `schedule` 1f1b | gpipe, `split` the names of the layers stages 2..P begin at
    (empty: balanced by `balance`, time | params). A resumed run keeps its checkpoint's split; run.finish writes the
    whole model as model.keras (on rank 0, `model` itself then holds every stage's trained weights)."""
    from hvdtrain import pipeline as pipelines
    from hvdtrain.log import get_logger
    world = run.world

    def build():
        if world.stages == 1:
            raise UserError("hvdtrain.keras.pipeline needs pipeline stages: start with "
                            "hvdtrain.keras.init(pipeline_stages=P), P > 1, under an MPI launch", agreed=True)
        cfg = _cli_config(parallel={"pipeline_stages": world.stages, "microbatches": microbatches,
                                    "schedule": schedule, "split": split or (), "balance": balance},
                          trainer={"global_batch_size": run.session.global_batch})
        config.check_world(cfg, world.size)   # e.g. micro-batches that do not divide the replica batch
        return pipelines.build(cfg, world, model, _objective(loss, metrics), get_logger(world.rank), run.run)
    built = backend.agree_on_errors(build, "hvdtrain.keras.pipeline")
    signature = _signature(model)
    signature["pipeline"] = built.layout()   # checkpoints hold its stages; a resume into another layout is refused
    built.stage._hvdtrain_staged = _Staged(built, signature)
    return built.stage


def _objective(loss, metrics):
    """The loss and metrics as pipeline.build asks a task for them. Objects only: a function's per-example losses
    would be summed, not averaged, and what a metric's name means depends on outputs a stage does not have."""
    import types

    import keras
    if not isinstance(loss, keras.losses.Loss):
        raise UserError(f"hvdtrain.keras.pipeline takes a keras.losses.Loss object (e.g. keras.losses."
                        f"SparseCategoricalCrossentropy(from_logits=True)), got {loss!r}", agreed=True)
    names = [m for m in metrics if not isinstance(m, keras.metrics.Metric)]
    if names:
        raise UserError(f"hvdtrain.keras.pipeline takes keras.metrics.Metric objects (e.g. keras.metrics."
                        f"SparseCategoricalAccuracy(name='accuracy')), got {names[0]!r}", agreed=True)
    return types.SimpleNamespace(loss=lambda: loss, metrics=lambda: list(metrics))


def _staged(model, world: World) -> _Staged | None:
    """A stage's _Staged, None for a whole model, which a pipelined world refuses (each rank holds one stage)."""
    staged = getattr(model, "_hvdtrain_staged", None)
    if staged is None and world.stages > 1:
        raise UserError(f"this world is a {world.stages}-stage pipeline, each rank holding one stage: pass the stage "
                        "hvdtrain.keras.pipeline returned, not the whole model", agreed=True)
    return staged


def _signature(model) -> dict:
    return checkpoint.signature(model, tuple(model.input_shape[1:]), int(model.output_shape[-1]), model.name)


def _exact_metrics(model, dataset, world: World, task: str, name: str) -> dict:
    """The whole model's exact metrics (inference.exact_metrics), through the stages for a pipeline's stage."""
    staged = _staged(model, world)
    if staged is None:
        from hvdtrain.inference import exact_metrics
        return exact_metrics(model, dataset, world, Task(task, int(model.output_shape[-1])), name, "held-out data")
    from hvdtrain.pipeline.serving import exact_metrics_through
    return exact_metrics_through(model, dataset, world, Task(task, staged.signature["num_classes"]), name,
                                 "held-out data")


def _checked_signature(model, world: World) -> dict:
    """What a checkpoint of `model` must match; a stage's optimizer must average over the stage's replicas only
    (over all ranks, the stages' different gradients would meet in one all-reduce)."""
    staged = _staged(model, world)
    if staged is None:
        return _signature(model)
    if getattr(model.optimizer, "_hvdtrain_group", None) != world.replica_group:
        raise UserError("a pipeline stage's optimizer must average over the stage's replicas: compile it with "
                        "hvdtrain.keras.distribute(optimizer, world=world)", agreed=True)
    return staged.signature


def _pipeline_summary(staged: _Staged | None) -> dict:
    """summary.json's pipeline entry, as `hvdtrain train` writes it."""
    return {} if staged is None else {"pipeline": staged.pipeline.summary()}


class Run:
    """Your script's training run in a run directory: resume, the reliability callbacks, the finish. Collectives
    happen in `__init__`, `resume`, `finish` and inside fit: call them on every rank, in the same order. `model` is
    a Keras model, or in a pipelined world the stage `pipeline` returned."""

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
        """Restore the latest checkpoint (weights, optimizer, position) if there is one; every rank the same one.
        A pipeline's checkpoint is restored stage by stage, and only into the same stages."""
        call = (lambda: self.session.resume(model, _checked_signature(model, self.world), mode))
        return backend.agree_on_errors(call, "hvdtrain.keras.resume")

    def fit(self, model, epoch_batches, evaluate=None, task: str = "classification", callbacks=(), **fit_kwargs):
        """model.fit from the resume position to the end, with all the callbacks in their order, as `hvdtrain train`
        fits: the rest of an interrupted epoch, then whole epochs, so epoch ends fall where they would have without
        the stop. `epoch_batches(epoch)` gives this rank's batches of epoch `epoch`, the same ones whenever it is
        asked (seed its shuffle with the epoch). `evaluate`: this rank's batches of a labelled held-out dataset
        (exact metrics at every epoch end, `val_*` in the logs, through the stages for a pipeline; see `evaluate`
        for which batches give one process's bits). `callbacks` run after hvdtrain's (they see averaged metrics);
        `fit_kwargs` go to model.fit. A data error on one rank stops every rank with its message."""
        self._evaluate = None if evaluate is None else \
            (lambda m: _exact_metrics(m, evaluate, self.world, task, "hvdtrain.keras.val"))
        staged = _staged(model, self.world)
        balance = [] if staged is None else [staged.pipeline.balance]   # the stages' measured balance, as the CLI logs it
        everything = self.session.callbacks(evaluate=self._evaluate) + balance + list(callbacks)
        fit_segments(model, _per_epoch(epoch_batches, self.steps_per_epoch), self.session, everything, **fit_kwargs)

    @property
    def stopped(self) -> bool:
        return self.session.status == "stopped"

    def finish(self, model, export: bool = True) -> dict:
        """Checkpoint, replica check, summary.json (rank 0), model.keras when complete (a pipeline's stages put
        back together into the whole model); returns the summary."""
        staged = _staged(model, self.world)
        summary = self.session.finish(model, self._evaluate, _pipeline_summary(staged))
        if export and summary["status"] == "completed":
            whole = model if staged is None else _assembled(staged, self.world)
            if self.world.is_chief:
                self.run.export_model(whole)
        return summary


def _assembled(staged: _Staged, world: World):
    """The whole model with every stage's trained weights on rank 0 (None elsewhere); every rank takes part."""
    from hvdtrain.pipeline import serving
    return serving.assemble(staged.pipeline, world)


def _per_epoch(epoch_batches, steps: int):
    """The session's `batches_from(first_epoch, epochs, skip)` from a function giving one epoch's batches."""
    def batches_from(first_epoch: int, epochs: int, skip: int):
        stream = epoch_batches(first_epoch).take(steps).skip(skip)
        for epoch in range(first_epoch + 1, epochs):
            stream = stream.concatenate(epoch_batches(epoch).take(steps))
        return stream
    return batches_from
