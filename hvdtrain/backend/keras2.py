"""The 2023 stack (TensorFlow 2.15, Keras 2): Horovod's own Keras layer, horovod.tensorflow.keras.

Its DistributedOptimizer hooks Keras 2's `_compute_gradients`/`_aggregate_gradients`; its fused all-reduce and
backward_passes_per_step are what hvdtrain's Keras 3 layer (backend/keras3.py) reproduces on Keras 3.
"""
from __future__ import annotations

import keras

from hvdtrain.backend import traffic
from hvdtrain.backend._horovod import hvd_keras
from hvdtrain.errors import UserError


def distributed_optimizer(optimizer, *, fp16_compression: bool = False, backward_passes_per_step: int = 1,
                          sparse_as_dense: bool = False, bucket_mb: float = 0.0, group: int | None = None,
                          switch=None):
    """Horovod's own Keras 2 optimizer; `bucket_mb` does not apply (it fuses what arrives within one cycle), and it
    averages over all ranks at every step only (`group`, a pipeline stage's replicas, and `switch`, local SGD's
    gradient switch, need the Keras 3 stack)."""
    if group is not None:
        raise UserError("parallel.pipeline_stages > 1 needs the Keras 3 stack (TensorFlow >= 2.16): the TF 2.15 stack "
                        "trains data-parallel only", agreed=True)
    if switch is not None:
        raise UserError("trainer.sync=local_sgd needs the Keras 3 stack (TensorFlow >= 2.16): the TF 2.15 stack "
                        "averages gradients at every step only", agreed=True)
    if is_distributed(optimizer):
        return optimizer
    h = hvd_keras()
    compression = _Counted(h.Compression.fp16 if fp16_compression else h.Compression.none)
    return h.DistributedOptimizer(optimizer, compression=compression, backward_passes_per_step=backward_passes_per_step,
                                  average_aggregated_gradients=True, sparse_as_dense=sparse_as_dense)


class _Counted:
    """A Horovod compressor that counts what it hands on: Horovod's layer compresses each dense gradient right
    before its all-reduce, so this is where the bytes are sent (traffic.py). Sparse gradients, which Horovod gathers
    uncompressed, are not counted on this stack."""

    def __init__(self, inner):
        self.inner = inner

    def compress(self, tensor):
        sent, context = self.inner.compress(tensor)
        traffic.count_tensors("gradients", [sent])
        return sent, context

    def decompress(self, tensor, context):
        return self.inner.decompress(tensor, context)


def is_distributed(optimizer) -> bool:
    if isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer):
        # Keras 2's loss scaler all-reduces nothing itself, but Horovod's DistributedOptimizer inside it averages the
        # gradients before the finiteness check (in _aggregate_gradients), so every rank sees the same verdict.
        return is_distributed(optimizer.inner_optimizer)
    return hasattr(optimizer, "_allreduce_grads")


def averaging_group(optimizer) -> None:
    """Horovod's Keras 2 optimizer averages over all ranks."""
    return None


def loss_scale(optimizer):
    return keras.mixed_precision.LossScaleOptimizer(optimizer)


def build_optimizer(optimizer, variables) -> None:
    """Create the optimizer's slots now (a checkpoint restores into them; a broadcast sends them), once."""
    if not getattr(optimizer, "_built", False):   # Keras 2 sets it in build()
        optimizer.build(variables)


def uses_xla(model) -> bool:
    return bool(getattr(model, "_jit_compile", False))


NEEDS_KERAS3 = "needs the Keras 3 stack (TensorFlow >= 2.16): the TF 2.15 stack keeps the whole optimizer state"


def sharded_optimizer(optimizer, **options):
    raise UserError(f"parallel.shard_state > 0 {NEEDS_KERAS3}; set parallel.shard_state=0", agreed=True)


def shard_stage(optimizer) -> int:
    return 0


def replicated_variables(optimizer) -> list:
    return list(optimizer.variables)


def optimizer_state(optimizer, variables):
    raise UserError(f"moving optimizer state between layouts {NEEDS_KERAS3}", agreed=True)


load_optimizer_state = state_range = whole_twin = optimizer_state


def held_bytes(model) -> dict:
    """summary.json's memory entry: weights, gradients (the trainable weights' bytes) and optimizer state."""
    from hvdtrain.variables import nbytes
    optimizer = getattr(model, "optimizer", None)
    return {"weights_bytes": nbytes(model.weights), "gradient_bytes": nbytes(model.trainable_variables),
            "optimizer_state_bytes": nbytes(optimizer.variables) if optimizer is not None else 0}
