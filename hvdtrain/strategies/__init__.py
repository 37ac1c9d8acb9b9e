"""How the ranks stay one model: one module per strategy, each implementing the interface of base.DataParallel, and
here the one place a strategy is chosen. The trainer, the Keras API and the commands get theirs from this factory.

  base        data parallelism, averaging the gradients every step (trainer.sync=every_step; the interface)
  local_sgd   local steps, then weight averages (trainer.sync=local_sgd)
  federated   federated averaging of simulated clients, rounds as epochs (trainer.sync=fedavg)
  pipeline    pipeline stages, each averaged over its replicas (parallel.pipeline_stages > 1; with split layers
              inside each stage when parallel.tensor_parallel > 1)
  tensor      split layers across each tensor group, each slice averaged over its replicas
              (parallel.tensor_parallel > 1, no pipeline stages)
  sharded     the checkpoint part of sharded optimizer state (parallel.shard_state > 0), which every-step averaging
              (base, pipeline) takes as a setting

A new strategy is a module here implementing the interface, an entry in STRATEGIES (and `name_for`), and its
settings and refusals in config.py.
"""
from __future__ import annotations

from hvdtrain.errors import UserError
from hvdtrain.strategies.base import DataParallel
from hvdtrain.strategies.federated import Federated
from hvdtrain.strategies.local_sgd import LocalSGD
from hvdtrain.strategies.pipeline import Pipeline
from hvdtrain.strategies.tensor import Tensor

STRATEGIES = {"every_step": DataParallel, "local_sgd": LocalSGD, "fedavg": Federated, "pipeline": Pipeline,
              "tensor": Tensor}


def name_for(cfg) -> str:
    """The strategy a config asks for (config.py has refused the combinations that do not exist)."""
    if cfg.parallel.pipelined:
        return "pipeline"
    return "tensor" if cfg.parallel.tensor_split else cfg.trainer.sync


def create(cfg, world, *, source=None, run=None) -> DataParallel:
    """The strategy of `hvdtrain train` with this config: `source` the training data, `run` the run directory."""
    strategy = STRATEGIES[name_for(cfg)].from_config(cfg, world, source=source, run=run)
    strategy.data_moves = source is None or source.elastic   # in memory: a global batch, whatever the ranks
    return strategy


def for_world(world) -> DataParallel:
    """A world's strategy for reading a trained model (evaluate, predict): through the stages when it has them, else
    split over the tensor groups when it has them."""
    if world.stages > 1:
        return Pipeline.reader(world)
    return Tensor.reader(world) if world.tensor > 1 else DataParallel(world)


def for_model(model, world) -> DataParallel:
    """The strategy that reads `model` in `world` (the Keras API's evaluate and predict): a pipeline's stage through
    its stages, a whole model data-parallel; a whole model in a pipelined world is refused. (A tensor-parallel model
    is read data-parallel too: the ranks of a tensor group read the same batches, one of them reports.)"""
    from hvdtrain.pipeline.stage import PipelineStage
    if world.stages == 1:
        return DataParallel(world)
    if not isinstance(model, PipelineStage):
        raise UserError(f"this world is a {world.stages}-stage pipeline, each rank holding one stage: pass the stage "
                        "hvdtrain.keras.pipeline returned, not the whole model", agreed=True)
    return Pipeline.reader(world)


def check_layout(ckpt, found: dict, expected: dict) -> None:
    """Refuse a checkpoint written by a layout this run cannot continue: another pipeline split, local SGD's
    rank-by-rank optimizer state on another layout, data read by file on another number of ranks
    (checkpoint.check_compatible calls it). Data-parallel checkpoints otherwise move: another number of ranks, sharded
    optimizer state or not (strategies/sharded.py re-shards it)."""
    if found.get("pipeline") != expected.get("pipeline"):
        raise UserError(f"checkpoint {ckpt} was written by {_stages(found.get('pipeline'))} and this run is "
                        f"{_stages(expected.get('pipeline'))}; resume with the parallel.pipeline_stages and "
                        "parallel.split that wrote it, or use a fresh --trainer.run_dir")
    if found.get("tensor") != expected.get("tensor"):
        raise UserError(f"checkpoint {ckpt} was written by {_split(found.get('tensor'))} and this run has "
                        f"{_split(expected.get('tensor'))}; resume with the parallel.tensor_parallel and "
                        "parallel.tensor_plan that wrote it, or use a fresh --trainer.run_dir")
    if found.get("per_rank") != expected.get("per_rank"):
        raise UserError(f"checkpoint {ckpt} holds {_optimizer_state(found.get('per_rank'))} and this run keeps "
                        f"{_optimizer_state(expected.get('per_rank'))}; resume with the ranks and "
                        "trainer.sync_optimizer_state that wrote it, or use a fresh --trainer.run_dir")
    theirs, ours = found.get("file_shards"), expected.get("file_shards")
    if theirs and ours and theirs != ours:
        raise UserError(f"checkpoint {ckpt} was written by {theirs} data-parallel ranks each reading its own files, "
                        f"and on {ours} the rest of the run would read other examples in another order; resume on "
                        f"{theirs} (or convert the data to .npz, whose global batches do not depend on the number of "
                        "ranks), or use a fresh --trainer.run_dir")


def _stages(layout) -> str:
    if not layout:
        return "data-parallel training (no pipeline stages)"
    return f"a {layout['stages']}-stage pipeline (stages beginning at {', '.join(layout['first_layers'])})"


def _split(layout) -> str:
    if not layout:
        return "no split layers"
    return f"layers split over {layout['degree']} ranks ({', '.join(f'{n}: {k}' for n, k in layout['plan'].items())})"


def _optimizer_state(per_rank) -> str:
    return f"each of {per_rank} ranks' own optimizer state (local SGD)" if per_rank else "one optimizer state"


def restore_whole(ckpt, model, meta: dict) -> None:
    """A trained run's weights (no optimizer) into the whole model, whatever strategy wrote the checkpoint."""
    from hvdtrain import checkpoint
    from hvdtrain.strategies import pipeline, tensor
    layout = meta.get("signature", {})
    if layout.get("pipeline"):
        pipeline.restore_whole(ckpt, model, layout["pipeline"], layout.get("tensor"))
    elif layout.get("tensor"):
        tensor.restore_whole(ckpt, model, layout["tensor"])
    elif layout.get("per_rank"):
        checkpoint.restore(ckpt, model, part="rank-0")   # local SGD: every rank's part holds the same weights
    else:
        checkpoint.restore(ckpt, model)


__all__ = ["STRATEGIES", "DataParallel", "Federated", "LocalSGD", "Pipeline", "Tensor", "check_layout", "create",
           "for_model", "for_world", "name_for", "restore_whole"]
