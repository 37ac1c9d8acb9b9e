"""Pipeline and hybrid (data x pipeline) parallelism: the model split into P stages, one per rank of a pipeline,
micro-batches flowing through them (GPipe or 1F1B), each stage's gradients averaged over its D replicas.

  schedule  the order of forwards and backwards on each stage, pure data (checked by simulation)
  split     the model cut where exactly one tensor crosses: by layer names, or balanced by measured time or parameters
  stage     one rank's stage as a Keras model whose train step runs the schedule (so `fit` and the controller run it)
  balance   each stage's measured share of its steps spent waiting, logged at every epoch end
  serving   exact evaluation and prediction through the stages, and the whole model put back together

Ranks are numbered stage = rank % P, replica = rank // P (see world.World). Activations travel by MPI point-to-point
(backend.p2p), gradients are averaged with Horovod on each stage's process set.
"""
from __future__ import annotations

from dataclasses import dataclass

from hvdtrain.errors import UserError, first_line
from hvdtrain.log import get_logger


@dataclass
class Pipeline:
    stage: object      # PipelineStage: this rank's model, trained by fit
    whole: object      # rank 0: the unsplit model (its other stages' weights are filled in for export); else None
    plan: object       # split.Plan
    channel: object    # backend.p2p.Channel
    balance: object    # balance.MeasuredBalance: a callback for fit
    built: int         # parameters of the whole model this rank made (rank 0: all; the others: their stage's)
    parallel: object   # config.ParallelConfig: the settings it was built with

    def layout(self) -> dict:
        """What a checkpoint must match to be restored stage by stage."""
        return {"stages": len(self.plan.starts), "first_layers": [self.plan.layers[s] for s in self.plan.starts]}

    def summary(self) -> dict:
        """summary.json's `pipeline` entry (a collective): the layout and settings, each rank's parameters made and
        trained, and its measured idle share."""
        from hvdtrain import backend
        mine = (self.built, self.stage.stage_model.count_params(), self.balance.idle_share())
        built, trained, idle = zip(*backend.allgather_object(mine, "hvdtrain.pipeline.summary"))
        return {**self.layout(), "replicas": self.stage.world.replicas, "schedule": self.parallel.schedule,
                "microbatches": self.parallel.microbatches, "stage_costs": list(self.plan.costs),
                "cost_unit": self.plan.unit,
                "built_parameters": list(built), "stage_parameters": list(trained), "idle_share": list(idle)}


_SET_BY_BUILDER = {}   # id(weight) -> the value the model's builder gave it (pretrained weights), until made
CANNOT_DEFER = "set parallel.stage_only=false (every rank then makes the whole model's weights)"


def build_whole(builder, world, stage_only: bool = True):
    """The whole model; on ranks other than 0 (with stage_only) without its weights: Keras's stateless scope defers
    them, so `build` (`make_only`) makes just this rank's stage's and the other stages' are never made. A deferred weight gets
    the value it would have had (an initializer draws its seed when it is made, not when it runs); a value the
    builder sets, such as a pretrained weight, is kept aside until its stage's weights are made. So every stage
    starts from the unsplit model's initial weights."""
    import keras
    if world.is_chief or not stage_only:
        return builder()
    _SET_BY_BUILDER.clear()
    try:
        with keras.StatelessScope(initialize_variables=False) as scope:
            whole = builder()
    except ValueError as exc:   # e.g. a weight made from a value, not an initializer
        raise UserError(f"ranks other than 0 could not build the model without its weights ({first_line(exc)}); "
                        f"{CANNOT_DEFER}") from None
    _SET_BY_BUILDER.update(scope.state_mapping)
    if held_parameters(whole):   # the builder ended the scope (keras.backend.clear_session): nothing was deferred
        get_logger(world.rank).warning(f"pipeline: rank {world.rank} made the whole model's weights (its builder "
                                       "ended Keras's stateless scope), not only its stage's")
    return whole


def make_only(stage_model) -> None:
    """Make the stage's deferred weights (see build_whole) and drop every reference to the rest, so they go with the
    whole model."""
    try:
        for variable in stage_model.variables:   # weights, and state such as a Dropout's seed
            if getattr(variable, "_value", True) is None:
                variable._deferred_initialize()
                if id(variable) in _SET_BY_BUILDER:
                    variable.assign(_SET_BY_BUILDER[id(variable)])
    except Exception as exc:   # e.g. an initializer seeded by a SeedGenerator made in the builder
        raise UserError(f"could not make this rank's stage's weights apart from the model's ({first_line(exc)}); "
                        f"{CANNOT_DEFER}") from None
    finally:
        _SET_BY_BUILDER.clear()
        _forget_deferred()


def initial_value(weight):
    """A deferred weight's value when it is made (see build_whole): what the model's builder set, else its
    initializer's (an initializer draws its seed when it is made, so this is the value it would have had)."""
    if id(weight) in _SET_BY_BUILDER:
        return _SET_BY_BUILDER[id(weight)]
    return weight._initializer(weight._shape, dtype=weight._dtype)


def _forget_deferred() -> None:
    from keras.src.backend.common import global_state   # Keras keeps every deferred weight in this list
    global_state.set_global_attribute("uninitialized_variables", [])


def held_parameters(whole) -> int:
    """Parameters this rank holds of the whole model (made weights only)."""
    from hvdtrain.pipeline.split import parameters
    return sum(parameters(w) for w in whole.weights if getattr(w, "_value", True) is not None)


def build(settings, world, whole, objective, log, global_batch: int, kept_split: tuple = (), cut=None) -> Pipeline:
    """This rank's stage of `whole` (the same model on every rank: from build_whole, or built whole, as the Keras
    API's user does), not yet compiled; the rest of the model is let go, except on rank 0. `settings`:
    config.ParallelConfig; `objective`: the loss and metrics (loss() and metrics()); `kept_split`: the first layers of
    stages 2..P of a checkpoint being resumed, used when `settings.split` names none; `cut`: the model cut into
    stages when it is not `whole` itself (its tensor-parallel model: the same layer names, in the same order)."""
    from hvdtrain import runtime
    from hvdtrain.backend.p2p import Channel
    from hvdtrain.config import check_pipeline_batch
    from hvdtrain.pipeline import split
    from hvdtrain.pipeline.balance import MeasuredBalance
    from hvdtrain.pipeline.stage import PipelineStage
    if runtime.keras_major() < 3:
        raise UserError("parallel.pipeline_stages > 1 needs the Keras 3 stack (TensorFlow >= 2.16): the TF 2.15 stack "
                        "trains data-parallel only", agreed=True)
    p = settings
    check_pipeline_batch(global_batch, p.microbatches, world.replicas)
    names, costs = p.split or kept_split, None
    if not names and p.balance == "time":
        costs = _measured(whole, global_batch // world.replicas // p.microbatches, world)
    plan, stage_models = split.plan(whole, p.pipeline_stages, names, costs)
    make_only(stage_models[world.stage])
    log.info(f"pipeline: {p.pipeline_stages} stages x {world.replicas} replica(s), {p.microbatches} micro-batches, "
             f"{p.schedule}; {plan.describe()}")
    stage = PipelineStage(stage_models[world.stage], world, Channel(), schedule=p.schedule,
                          microbatches=p.microbatches, loss=objective.loss(), metrics=objective.metrics(),
                          whole_outputs=int(whole.output_shape[-1]),
                          earlier_trains=any(m.trainable_weights for m in stage_models[:world.stage]))
    # The other stages' layers go with the whole model (only rank 0 keeps it, to write model.keras at the end).
    return Pipeline(stage=stage, whole=whole if world.is_chief else None, plan=plan, channel=stage.channel,
                    balance=MeasuredBalance(stage.channel, world, p.microbatches, log), built=held_parameters(whole),
                    parallel=p)


def _measured(whole, micro_batch: int, world) -> list:
    """Rank 0's measurement, the same split on every rank."""
    from hvdtrain import backend
    from hvdtrain.pipeline import split
    return backend.broadcast_object(split.measured_costs(whole, micro_batch) if world.is_chief else None,
                                    "hvdtrain.pipeline.costs")
