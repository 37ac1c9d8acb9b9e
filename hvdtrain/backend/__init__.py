"""Horovod behind one door: the only package that imports it (in `_horovod.py`, lazily), and mpi4py (`_mpi.py`).

Everything else receives a plain `World` value and calls the functions here, so config, data and model code run and
are unit-tested without MPI. Three parts:

  environment  launcher detection and the HOROVOD_*/OMPI_* settings (no Horovod import at all)
  collectives  init, topology and the framework-neutral collectives (the same on Keras 2 and Keras 3)
  keras3 / keras2  the one seam between Keras versions: distributed optimizer, loss scaling, XLA check.
               Keras 3 (TensorFlow >= 2.16) gets hvdtrain's own layer; Keras 2 (TensorFlow 2.15) Horovod's own.
               The choice is made once, on first use, from `runtime.keras_major()`.
  _mpi         MPI itself, where Horovod's collectives are not the tool (raw MPI, point-to-point)
"""
from __future__ import annotations

import functools

from hvdtrain import runtime
from hvdtrain.backend._mpi import library_version as mpi_library_version
from hvdtrain.backend._mpi import mpi
from hvdtrain.backend.collectives import (agree_on_errors, all_agree, allgather_object, allreduce, allreduce_min,
                                       allreduce_sum, barrier, broadcast_object, broadcast_variables, build_info,
                                       collective_failure, follow_leaver, from_horovod, gather_agreed, init, join,
                                       leave_with, raise_first, topology, variable_averager)
from hvdtrain.backend.traffic import sent as sent_bytes
from hvdtrain.backend.environment import (active_comm_settings, apply_comm_environment, comm_environment,
                                       launched_by_mpi, launched_elastic, launcher_name, local_size_hint, rank_hint,
                                       srun_step_tasks, under_launcher)


@functools.lru_cache(maxsize=1)
def _keras_layer():
    if runtime.keras_major() >= 3:
        from hvdtrain.backend import keras3 as layer
    else:
        from hvdtrain.backend import keras2 as layer
    return layer


def distributed_optimizer(optimizer, *, fp16_compression: bool = False, backward_passes_per_step: int = 1,
                          sparse_as_dense: bool = False, bucket_mb: float = 0.0, group: int | None = None,
                          switch=None):
    """`optimizer`, made to average gradients over all ranks with a fused ring all-reduce (use the returned object).

    fp16_compression halves the bytes sent; backward_passes_per_step accumulates gradients locally and all-reduces
    once per optimizer step; sparse_as_dense all-reduces embedding gradients densely instead of gathering them;
    bucket_mb > 0 sends the gradients in buckets of that size as the backward pass produces them (Keras 3; on Keras 2
    Horovod fuses what arrives within one cycle, HOROVOD_FUSION_THRESHOLD).
    A LossScaleOptimizer (mixed_float16) is rebuilt around a distributed inner optimizer with an agreed finiteness
    check, so all ranks skip the same steps. `group` (a pipeline stage, Keras 3): average over that stage's replicas only.
    `switch` (a boolean variable, Keras 3): average only in the steps where it is true (local SGD's warm-up).
    """
    return _keras_layer().distributed_optimizer(optimizer, fp16_compression=fp16_compression,
                                                backward_passes_per_step=backward_passes_per_step,
                                                sparse_as_dense=sparse_as_dense, bucket_mb=bucket_mb, group=group,
                                                switch=switch)


def sharded_optimizer(optimizer, *, stage: int, fp16_compression: bool = False, backward_passes_per_step: int = 1,
                      group: int | None = None, **ignored):
    """`optimizer` with its state (stage 1) and its averaged gradients (stage 2) sharded over the replicas of `group`
    (None: all ranks; a pipeline stage's replicas): a reduce-scatter of the gradients, this rank's range updated, an
    all-gather of the weights (backend/sharded.py). Keras 3 only."""
    return _keras_layer().sharded_optimizer(optimizer, stage=stage, fp16_compression=fp16_compression,
                                            backward_passes_per_step=backward_passes_per_step, group=group)


def shard_stage(optimizer) -> int:
    """The sharding stage of an optimizer (0: it holds the whole state)."""
    return _keras_layer().shard_stage(optimizer)


def replicated_variables(optimizer) -> list:
    """The optimizer variables every replica holds alike (what the start broadcast sends)."""
    return _keras_layer().replicated_variables(optimizer)


def optimizer_state(optimizer, variables):
    """This rank's optimizer state in the layout-free form checkpoints keep (sharded.OptimizerState); a collective for
    a stage-1 optimizer that accumulates gradients."""
    return _keras_layer().optimizer_state(optimizer, variables)


def load_optimizer_state(optimizer, variables, scalars: dict, read) -> None:
    """Set a built optimizer's state from scalars and `read(slot, lo, hi)`, whatever layout wrote them."""
    _keras_layer().load_optimizer_state(optimizer, variables, scalars, read)


def state_range(optimizer, variables) -> tuple[int, int, int]:
    """(lo, hi, total): the flat range of the slots this rank's optimizer holds."""
    return _keras_layer().state_range(optimizer, variables)


def whole_twin(optimizer):
    """An unbuilt plain optimizer holding the whole state as stage 0 would for this sharded one."""
    return _keras_layer().whole_twin(optimizer)


def held_bytes(model) -> dict:
    """summary.json's memory entry of this rank: weights_bytes, gradient_bytes, optimizer_state_bytes."""
    return _keras_layer().held_bytes(model)


def gradient_buckets(variables, bucket_mb: float) -> list[list[int]] | None:
    """The positions of these variables' gradients in each all-reduce of a step with this runtime.bucket_mb (Keras 3;
    None on Keras 2, where Horovod's layer sends one request per tensor)."""
    layer = _keras_layer()
    return layer.gradient_buckets(variables, bucket_mb) if hasattr(layer, "gradient_buckets") else None


def is_distributed(optimizer) -> bool:
    return _keras_layer().is_distributed(optimizer)


def averaging_group(optimizer) -> int | None:
    """The replica group a distributed optimizer averages over: None for all ranks, else a pipeline stage's."""
    return _keras_layer().averaging_group(optimizer)


def loss_scale(optimizer):
    """Wrap a (distributed) optimizer for mixed_float16 loss scaling, with the finiteness decision agreed."""
    return _keras_layer().loss_scale(optimizer)


def build_optimizer(optimizer, variables) -> None:
    _keras_layer().build_optimizer(optimizer, variables)


def uses_xla(model) -> bool:
    return _keras_layer().uses_xla(model)


def integration() -> str:
    """Which Keras layer is in use, for doctor and benchmark reports."""
    return runtime.KERAS_LAYERS[runtime.stack()]


def elastic_state(variables_fn, **counters):
    """Horovod Elastic state: the given variables plus progress counters (e.g. epoch=0), committed and synced.

    Horovod's own Keras state calls `optimizer.variables()` (a list property on Keras 2.11+ and Keras 3) and its
    TensorFlowState does not re-broadcast variables in eager mode; this one does both correctly, on both stacks.
    """
    from hvdtrain.backend._horovod import hvd, hvd_elastic
    _, ObjectState = hvd_elastic()
    h = hvd()

    class VariablesState(ObjectState):
        def __init__(self):
            super().__init__(bcast_object=h.broadcast_object, get_rank=h.rank, **counters)
            self._save_variables()

        def _save_variables(self):
            self._saved = [v.numpy() for v in variables_fn()]

        def save(self):
            self._save_variables()
            super().save()

        def restore(self):
            for variable, value in zip(variables_fn(), self._saved):
                variable.assign(value)
            super().restore()

        def sync(self):  # a joining worker receives rank 0's variables and counters here
            broadcast_variables(variables_fn(), name="hvdtrain.elastic.sync")
            self._save_variables()
            super().sync()

    return VariablesState()


def elastic_run(fn):
    """hvd.elastic.run: re-run fn(state) after each membership change, from the last committed state."""
    from hvdtrain.backend._horovod import hvd_elastic
    elastic, _ = hvd_elastic()
    return elastic.run(fn)


__all__ = ["active_comm_settings", "agree_on_errors", "all_agree", "allgather_object", "allreduce", "allreduce_min",
           "allreduce_sum", "apply_comm_environment", "barrier", "broadcast_object", "broadcast_variables",
           "averaging_group", "build_info", "build_optimizer", "collective_failure", "comm_environment",
           "distributed_optimizer", "elastic_run", "elastic_state", "follow_leaver", "from_horovod",
           "gather_agreed", "held_bytes", "init", "integration", "is_distributed", "join", "launched_by_mpi",
           "launched_elastic", "launcher_name", "leave_with", "load_optimizer_state", "local_size_hint", "loss_scale",
           "mpi", "mpi_library_version", "optimizer_state", "raise_first", "rank_hint", "replicated_variables",
           "sent_bytes", "shard_stage", "sharded_optimizer", "srun_step_tasks", "state_range", "topology",
           "under_launcher", "uses_xla", "variable_averager", "whole_twin"]
