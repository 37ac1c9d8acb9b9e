"""Pipeline and hybrid (data x pipeline) parallelism: the model split into P stages, one per rank of a pipeline,
micro-batches flowing through them (GPipe or 1F1B), each stage's gradients averaged over its D replicas.

  schedule  the order of forwards and backwards on each stage, pure data (checked by simulation)
  split     the model cut where exactly one tensor crosses: by layer names, or balanced by parameters
  stage     one rank's stage as a Keras model whose train step runs the schedule (so `fit` and the controller run it)
  serving   exact evaluation through the stages, and the whole model put back together for model.keras

Ranks are numbered stage = rank % P, replica = rank // P (see world.World). Activations travel by MPI point-to-point
(backend.p2p), gradients are averaged with Horovod on each stage's process set.
"""
from __future__ import annotations

from dataclasses import dataclass

from hvdtrain.errors import UserError


@dataclass
class Pipeline:
    stage: object      # PipelineStage: this rank's model, trained by fit
    whole: object      # rank 0: the unsplit model (its other stages' weights are filled in for export); else None
    plan: object       # split.Plan
    channel: object    # backend.p2p.Channel

    def layout(self) -> dict:
        """What a checkpoint must match to be restored stage by stage."""
        return {"stages": len(self.plan.starts), "first_layers": [self.plan.layers[s] for s in self.plan.starts]}


def build(cfg, world, whole, task, log, run=None) -> Pipeline:
    """This rank's stage of `whole` (built alike on every rank, so every stage starts from the unsplit model's
    initial weights), not yet compiled; the rest of the model is let go, except on rank 0. `run`: the run directory,
    whose checkpoint's split a resume keeps."""
    from hvdtrain import runtime
    from hvdtrain.backend.p2p import Channel
    from hvdtrain.pipeline import split
    from hvdtrain.pipeline.stage import PipelineStage
    if runtime.keras_major() < 3:
        raise UserError("parallel.pipeline_stages > 1 needs the Keras 3 stack (TensorFlow >= 2.16): the TF 2.15 stack "
                        "trains data-parallel only", agreed=True)
    p = cfg.parallel
    names, costs = p.split or _checkpoint_split(run, cfg, p.pipeline_stages), None
    if not names and p.balance == "time":
        micro_batch = cfg.trainer.global_batch_size // world.replicas // p.microbatches
        costs = _measured(whole, micro_batch, world)
    plan, stage_models = split.plan(whole, p.pipeline_stages, names, costs)
    log.info(f"pipeline: {p.pipeline_stages} stages x {world.replicas} replica(s), {p.microbatches} micro-batches, "
             f"{p.schedule}; {plan.describe()}")
    stage = PipelineStage(stage_models[world.stage], world, Channel(), schedule=p.schedule,
                          microbatches=p.microbatches, loss=task.loss(), metrics=task.metrics())
    # The other stages' layers go with the whole model (only rank 0 keeps it, to write model.keras at the end).
    return Pipeline(stage=stage, whole=whole if world.is_chief else None, plan=plan, channel=stage.channel)


def _checkpoint_split(run, cfg, stages: int) -> tuple:
    """The split of the run's latest checkpoint, when it has one of as many stages (else empty)."""
    from hvdtrain import checkpoint
    latest = checkpoint.latest(run.path) if run is not None and cfg.trainer.resume != "never" else None
    layout = checkpoint.read_meta(latest).get("signature", {}).get("pipeline") if latest else None
    return tuple(layout["first_layers"][1:]) if layout and layout["stages"] == stages else ()


def _measured(whole, micro_batch: int, world) -> list:
    """Rank 0's measurement, the same split on every rank."""
    from hvdtrain import backend
    from hvdtrain.pipeline import split
    return backend.broadcast_object(split.measured_costs(whole, micro_batch) if world.is_chief else None,
                                    "hvdtrain.pipeline.costs")
