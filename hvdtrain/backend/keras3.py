"""hvdtrain's own Horovod integration for Keras 3 (TensorFlow >= 2.16), where horovod.tensorflow.keras breaks.

Horovod's Keras layer hooks `get_gradients`/`_compute_gradients`/`_aggregate_gradients`, which Keras 3 never calls,
and its callbacks use `K.get_value`, `optimizer.lr` and `variable.ref()`, which Keras 3 does not have (horovod
issue 4290). Keras 3's train step calls `optimizer.apply(grads)`; `apply` unscales, then `_backend_apply_gradients`
accumulates gradients locally (gradient_accumulation_steps) and, on an update step, calls `_clip_gradients` right
before the update. That is where the average over ranks goes: after local accumulation (one all-reduce per
optimizer step, as backward_passes_per_step promises) and before clipping (which must see the averaged gradient).

Loss scaling (mixed_float16): a LossScaleOptimizer decides locally whether the gradients are finite and only then
calls the inner optimizer; two ranks deciding differently would leave one waiting in the all-reduce forever. The
LossScaleOptimizer made here agrees on finiteness over all ranks (a MIN-reduce), so every rank skips the same steps.
"""
from __future__ import annotations

import math

from keras.optimizers import LossScaleOptimizer

from hvdtrain.backend import traffic
from hvdtrain.backend._horovod import hvd
from hvdtrain.backend.environment import launched_elastic
from hvdtrain.errors import UserError

_MARK = "_hvdtrain_distributed"


def distributed_optimizer(optimizer, *, fp16_compression: bool = False, backward_passes_per_step: int = 1,
                          sparse_as_dense: bool = False, bucket_mb: float = 0.0, group: int | None = None,
                          switch=None):
    """A copy of `optimizer` (rebuilt from its config, not yet built) that averages gradients over all ranks (or over
    one pipeline stage's replicas: `group`); with `switch` (a boolean variable), only in the steps where it is true."""
    if is_distributed(optimizer):
        return optimizer
    if isinstance(optimizer, LossScaleOptimizer):
        inner = distributed_optimizer(optimizer.inner_optimizer, fp16_compression=fp16_compression,
                                      backward_passes_per_step=backward_passes_per_step, sparse_as_dense=sparse_as_dense,
                                      bucket_mb=bucket_mb, group=group, switch=switch)
        return _AgreedLossScaleOptimizer(inner, initial_scale=optimizer.initial_scale,
                                         dynamic_growth_steps=optimizer.dynamic_growth_steps, name=optimizer.name)
    config = optimizer.get_config()
    if backward_passes_per_step > 1:
        if config.get("gradient_accumulation_steps"):
            raise UserError(f"the optimizer already accumulates gradients (gradient_accumulation_steps="
                            f"{config['gradient_accumulation_steps']}); set that or backward_passes_per_step, not both")
        config["gradient_accumulation_steps"] = backward_passes_per_step
    cls = _distributed_class(type(optimizer))
    try:
        distributed = cls.from_config(config)
    except Exception as exc:  # e.g. a learning-rate schedule that is not registered as serializable
        raise UserError(f"cannot rebuild {type(optimizer).__name__} from its config to distribute it ({exc}); register "
                        "custom schedules with keras.saving.register_keras_serializable()") from None
    distributed._hvdtrain_average = _averager(fp16_compression, sparse_as_dense, _bytes(bucket_mb), group, switch)
    return distributed


def averaging_group(optimizer) -> int | None:
    """The replica group a distributed optimizer averages over (None: all ranks)."""
    inner = optimizer.inner_optimizer if isinstance(optimizer, LossScaleOptimizer) else optimizer
    if hasattr(inner, "_hvdtrain_group"):   # sharded state (sharded.py)
        return inner._hvdtrain_group
    return inner._hvdtrain_average.group


def is_distributed(optimizer) -> bool:
    """True for an optimizer made by distributed_optimizer (a LossScaleOptimizer counts only if it agrees on
    finiteness and wraps a distributed optimizer)."""
    if isinstance(optimizer, LossScaleOptimizer):
        return isinstance(optimizer, _AgreedLossScaleOptimizer) and is_distributed(optimizer.inner_optimizer)
    return bool(getattr(type(optimizer), _MARK, False))


def loss_scale(optimizer):
    """The mixed_float16 wrapper: a LossScaleOptimizer whose finiteness check is agreed by all ranks."""
    return _AgreedLossScaleOptimizer(optimizer)


def _distributed_class(base: type) -> type:
    def _clip_gradients(self, grads):
        return base._clip_gradients(self, self._hvdtrain_average(grads))

    # Same name and module as the base class: a model saved with this optimizer loads as a plain Keras one.
    return type(base.__name__, (base,), {"_clip_gradients": _clip_gradients, _MARK: True,
                                         "__module__": base.__module__, "__doc__": base.__doc__})


def _bytes(mb: float) -> int:
    return math.ceil(mb * 2**20)   # rounded up: any size above 0 makes buckets, one per tensor below a byte


def gradient_buckets(variables, bucket_mb: float) -> list[list[int]]:
    """The buckets the averager makes for these (dense) variables' gradients."""
    import tensorflow as tf
    return buckets([int(tf.size(v.value)) * tf.as_dtype(v.dtype).size for v in variables], _bytes(bucket_mb))


def buckets(nbytes: list[int], limit: int) -> list[list[int]]:
    """Positions of gradients of these sizes, in buckets of at least `limit` bytes (the last one may be smaller),
    filled in the order the backward pass produces them: the last layer's first. 0: one bucket for all."""
    order = list(reversed(range(len(nbytes))))
    if limit <= 0:
        return [order] if order else []
    out, current, filled = [], [], 0
    for i in order:
        current.append(i)
        filled += nbytes[i]
        if filled >= limit:
            out.append(current)
            current, filled = [], 0
    return out + ([current] if current else [])


def _averager(fp16_compression: bool, sparse_as_dense: bool, bucket_bytes: int = 0, group: int | None = None,
              switch=None):
    """grads -> their average over ranks: dense ones in grouped (fused) all-reduces, one per bucket of about
    `bucket_bytes` (0: one for all), sparse ones (IndexedSlices from embeddings) gathered, or densified first with
    sparse_as_dense. Inside the compiled train step an all-reduce waits only for its own bucket's gradients, so the
    buckets of the last layers can be on the wire while the backward pass is still computing the first layers'.
    With `switch` (local SGD's warm-up), the average runs in the steps where the variable is true, else the rank's own
    gradients pass through; every rank holds the same value, so all take the same branch."""
    import tensorflow as tf
    from hvdtrain.backend.collectives import _group_size, _process_set
    h = hvd()
    compression = h.Compression.fp16 if fp16_compression else h.Compression.none
    members = _process_set(group)

    def average(grads):
        grads = list(grads)
        # Like Horovod: one rank without elasticity needs no communication (elastic jobs may grow later).
        if _group_size(group) == 1 and not launched_elastic():
            return grads
        if sparse_as_dense or switch is not None:   # both branches of the switch must give the same kinds
            grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        if switch is None:
            return reduce(grads)
        present = [i for i, g in enumerate(grads) if g is not None]
        chosen = tf.cond(switch, lambda: reduce([grads[i] for i in present]), lambda: [grads[i] for i in present])
        out = list(grads)
        for i, g in zip(present, chosen):
            out[i] = g
        return out
    average.group = group

    def reduce(grads):
        dense = [i for i, g in enumerate(grads) if g is not None and not isinstance(g, tf.IndexedSlices)]
        out = list(grads)
        # Bytes from static shapes (unknown: 0), the same on every rank, so every rank makes the same buckets.
        sizes = [(grads[i].shape.num_elements() or 0) * grads[i].dtype.size if bucket_bytes else 0 for i in dense]
        for bucket in buckets(sizes, bucket_bytes):
            positions = [dense[j] for j in bucket]
            # Compressed here rather than by Horovod (the same ops), so the bytes counted are the bytes sent.
            sent, contexts = zip(*(compression.compress(grads[i]) for i in positions))
            traffic.count_tensors("gradients", sent)
            reduced = h.grouped_allreduce(list(sent), op=h.Average, process_set=members)
            for i, g, context in zip(positions, reduced, contexts):
                out[i] = compression.decompress(g, context)
        for i, g in enumerate(grads):
            if isinstance(g, tf.IndexedSlices):   # gathered: every rank's rows and their indices
                traffic.count_tensors("gradients", [g.values, g.indices])
                out[i] = h.allreduce(g, op=h.Average, compression=compression, process_set=members)
        return out
    return average


class _AgreedLossScaleOptimizer(LossScaleOptimizer):
    """LossScaleOptimizer whose 'are the gradients finite?' is the AND over all ranks."""

    def check_finite(self, grads):
        import tensorflow as tf
        local = super().check_finite(grads)
        h = hvd()
        if h.size() == 1 and not launched_elastic():
            return local
        return h.allreduce(tf.cast(local, tf.int32), op=h.Min, name="hvdtrain.loss_scale.finite") > 0


# Saved models name the base class, so the agreed loss scaler also saves (and loads) as a plain LossScaleOptimizer.
_AgreedLossScaleOptimizer.__name__ = _AgreedLossScaleOptimizer.__qualname__ = "LossScaleOptimizer"
_AgreedLossScaleOptimizer.__module__ = LossScaleOptimizer.__module__


def build_optimizer(optimizer, variables) -> None:
    """Create the optimizer's slots now (a checkpoint restores into them; a broadcast sends them), once."""
    if not optimizer.built:
        optimizer.build(variables)


def uses_xla(model) -> bool:
    """Keras 3 compiles the train step with XLA by default on GPUs (jit_compile='auto'); Horovod's ops have no XLA
    kernels (hvdtrain builds Horovod without its XLA ops)."""
    return bool(getattr(model, "jit_compile", False))


# Sharded optimizer state (parallel.shard_state), and an optimizer's state whatever its layout.
from hvdtrain.backend.sharded import (held_bytes, load_optimizer_state, optimizer_state, replicated_variables,  # noqa: E402,F401
                                      shard_stage, sharded_optimizer, state_range, whole_twin)
