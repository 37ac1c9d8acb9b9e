"""Through the stages after training: exact evaluation (during training, and of a trained run by `hvdtrain evaluate
--parallel.pipeline_stages=P`), and the whole model put back together."""
from __future__ import annotations

import numpy as np

from hvdtrain import backend
from hvdtrain.data.sharding import in_batch_order
from hvdtrain.inference.evaluate import ordered_total

WEIGHTS_TAG = (1 << 20) + 2


class PipelineEvaluator:
    """Like inference.Evaluator, through the pipeline: each replica's pipeline evaluates the replica's share (the
    single-process run's batches, dealt whole over the replicas); the last stages' batch sums are added in batch
    order, so the result is bit for bit one process's."""

    def __init__(self, source, world, task, split: str = "test", batch: int = 256):
        self.world, self.task, self.split = world, task, split
        self.share = source.eval_share(world.data_view(), split, batch) if source.has_split(split) else None

    def __call__(self, stage) -> dict | None:
        if self.share is None:
            return None
        w = self.world

        def read():
            sums = []
            for x, y in self.share.dataset:
                scores = stage.forward(x)
                if scores is not None:
                    sums.append(np.stack([np.asarray(s) for s in self.task.batch_sums(scores, y)]))
            stage.channel.flush()
            return sums
        parts = backend.gather_agreed(read, f"hvdtrain.pipeline.evaluate.{self.split}")
        last_stages = [parts[replica * w.stages + w.stages - 1] for replica in range(w.replicas)]
        total = ordered_total(in_batch_order(last_stages), len(self.task.sum_names()))
        return self.task.metrics_from_sums(total)


def assemble(pipeline, world):
    """The whole model with every stage's trained weights, on rank 0 (None elsewhere): each stage's first replica
    sends its layers' weights to rank 0. Every rank calls it."""
    stage = pipeline.stage.stage_model
    if world.rank == 0:
        layers = {layer.name: layer for layer in pipeline.whole.layers}
        for source in range(1, world.stages):
            for name, weights in pipeline.channel.recv_object(source, WEIGHTS_TAG).items():
                layers[name].set_weights(weights)
        return pipeline.whole
    if world.replica == 0:
        pipeline.channel.send_object({layer.name: layer.get_weights() for layer in stage.layers if layer.weights},
                                     0, WEIGHTS_TAG)
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
