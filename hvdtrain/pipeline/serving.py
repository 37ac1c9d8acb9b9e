"""Through the stages after training: exact evaluation (during training, and of a trained run by `hvdtrain evaluate
--parallel.pipeline_stages=P`), prediction (`hvdtrain predict --parallel.pipeline_stages=P`), and the whole model
put back together."""
from __future__ import annotations

import contextlib

import numpy as np

from hvdtrain import backend
from hvdtrain.data.sharding import in_batch_order
from hvdtrain.inference.evaluate import check_count, ordered_total, read_errors, reading
from hvdtrain.inference.predict import predict_read_errors
from hvdtrain.pipeline.stage import WEIGHTS_TAG


class PipelineEvaluator:
    """Like inference.Evaluator, through the pipeline: each replica's pipeline evaluates the replica's share (the
    single-process run's batches, dealt whole over the replicas)."""

    def __init__(self, source, world, task, split: str = "test", batch: int = 256):
        self.source, self.world, self.task, self.split = source, world, task, split
        self.share = source.eval_share(world.data_view(), split, batch) if source.has_split(split) else None

    def __call__(self, stage) -> dict | None:
        if self.share is None:
            return None
        return exact_metrics_through(stage, self.share.dataset, self.world, self.task,
                                     f"hvdtrain.pipeline.evaluate.{self.split}", f"{self.split} data",
                                     diagnose=lambda: self.source.diagnose(self.world.data_view(), self.split),
                                     expected=self.share.count)


def exact_metrics_through(stage, dataset, world, task, name: str = "hvdtrain.evaluate", where: str = "held-out data",
                          diagnose=None, expected: int | None = None) -> dict:
    """inference.exact_metrics through the stages: `dataset` is this replica's batches (x, y), read by the first
    stage only (the labels travel with the activations). The last stages' batch sums are added in batch order
    (replica d's k-th batch is batch d + k*D), so the result is bit for bit one process's."""
    def read():
        sums = [np.stack([np.asarray(s) for s in task.batch_sums(scores, y)])
                for y, scores in through(stage, dataset, lambda: read_errors(where, diagnose)) if scores is not None]
        if world.last_stage:
            check_count(sums, task, where, diagnose, expected)
        return sums
    parts = backend.gather_agreed(read, f"{name}.read")
    return task.metrics_from_sums(ordered_total(in_batch_order(last_stages(parts, world)), len(task.sum_names())))


def predictions_through(stage, share, task):
    """The prediction fields of each batch of this replica's share, on the last stage (nothing on the others):
    inference.write_predictions' batches. The first stage reads the inputs."""
    for _, scores in through(stage, ((x,) for x in share.dataset), predict_read_errors):
        if scores is not None:
            yield {k: v.numpy() for k, v in task.predictions(scores).items()}


def through(stage, batches, context=contextlib.nullcontext):
    """(labels, scores) of each batch of the replica, scores on the last stage only (None elsewhere). The first
    stage reads `batches` ((x,) or (x, y) items; inside `context()`) and ends the stream after the last one; the
    others take what the previous stage sends until the stream ends. Every stage ends the stream for the next, also
    when it fails, and receives to its end, so no stage waits for a batch that will not come and no message is left
    behind for the next call. A failure is raised after that: the agreement then names it."""
    if stage.world.first_stage:
        yield from _reading(stage, batches, context)
    else:
        yield from _receiving(stage)


def _reading(stage, batches, context):
    try:
        for item in reading(batches, context):
            y = item[1] if len(item) > 1 else None
            yield y, stage.serve(item[0], y)
    finally:
        stage.end_stream()


def _receiving(stage):
    failure = None
    while (batch := stage.receive()) is not None:
        if failure is not None:
            continue   # drained: the previous stage's sends complete, nothing stays queued
        try:
            yield batch[1], stage.serve(*batch)
        except (Exception, GeneratorExit) as exc:   # this stage, or its consumer, failed: finish the stream first
            failure = exc
    stage.end_stream()
    if failure is not None:
        raise failure


def last_stages(parts: list, world) -> list:
    """Of one item per rank, the last stages' items in replica order (one rank of a tensor group's)."""
    return [parts[rank] for rank in world.reporters()]


def assemble(pipeline, world, merged: dict | None = None):
    """The whole model with every stage's trained weights, on rank 0 (None elsewhere): each stage's first replica
    sends its layers' weights to rank 0. Every rank calls it. `merged`: this rank's split layers' whole weights
    (tensor parallelism: put together from the tensor group's slices; the first tensor rank sends them)."""
    if world.rank == 0:   # its stage's layers are the whole model's own, but for split ones
        layers = {layer.name: layer for layer in pipeline.whole.layers}
        received = [pipeline.channel.recv_object(world.rank_of(0, s), WEIGHTS_TAG) for s in range(1, world.stages)]
        for weights in [merged or {}, *received]:
            for name, values in weights.items():
                layers[name].set_weights(values)
        return pipeline.whole
    if world.replica == 0 and world.tensor_rank == 0:
        stage = pipeline.stage.stage_model
        weights = {layer.name: layer.get_weights() for layer in stage.layers if layer.weights}
        pipeline.channel.send_object({**weights, **(merged or {})}, 0, WEIGHTS_TAG)
        pipeline.channel.flush()
    return None


def stage_of(trained, world):
    """This rank's stage of a trained run's model for inference: split as the run's checkpoint was (when it was a
    pipeline of as many stages), else balanced by parameters."""
    from hvdtrain import checkpoint
    from hvdtrain.backend.p2p import Channel
    from hvdtrain.pipeline import split
    from hvdtrain.pipeline.stage import PipelineStage
    layout = checkpoint.read_meta(trained.ckpt).get("signature", {}).get("pipeline") or {}
    names = tuple(layout["first_layers"][1:]) if layout.get("stages") == world.stages else ()
    _, stage_models = split.plan(trained.model, world.stages, names)
    return PipelineStage(stage_models[world.stage], world, Channel(), schedule="gpipe", microbatches=1)
