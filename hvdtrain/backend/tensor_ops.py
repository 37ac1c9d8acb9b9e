"""Megatron-LM's two conjugate operators of tensor parallelism, over Horovod's all-reduce on a tensor group's process
set (Shoeybi et al. 2019; megatron/core/tensor_parallel/mappings.py):

  copy_to_group (f)       identity forward; backward, the all-reduce (sum) of the gradient. Before a column-parallel
                          layer: each rank's slice of the layer sends back its part of the input's gradient.
  reduce_from_group (g)   forward, the all-reduce (sum) of the partial outputs; backward, identity. After a
                          row-parallel layer (each rank multiplied its slice of the inputs by its rows).

Both are `tf.custom_gradient` functions: the gradient Horovod registers for its all-reduce is another all-reduce,
which is right for averaging gradients and wrong for f and g. Their bytes are counted where they are handed to
Horovod (traffic.py): as `tensor` while training, as `evaluation` otherwise.
"""
from __future__ import annotations

import tensorflow as tf

from hvdtrain.backend import traffic
from hvdtrain.backend._horovod import hvd
from hvdtrain.backend.collectives import _process_set


def _kind(training) -> str:
    return "tensor" if training else "evaluation"


def _summed(x, group, kind: str):
    """The sum of `x` over the group's ranks (a collective of the group), its bytes counted."""
    h = hvd()
    traffic.count_tensors(kind, [x])
    return h.allreduce(x, op=h.Sum, process_set=_process_set(group))


def copy_to_group(x, group, training=None):
    """Megatron's f: `x` as it is; in the backward pass the gradient summed over the tensor group `group` (a tuple of
    ranks)."""
    kind = _kind(training)

    @tf.custom_gradient
    def f(value):
        def grad(dy):
            return _summed(dy, group, kind)
        return tf.identity(value), grad
    return f(x)


def reduce_from_group(x, group, training=None):
    """Megatron's g: `x` summed over the tensor group `group`; in the backward pass the gradient as it is."""
    kind = _kind(training)

    @tf.custom_gradient
    def g(value):
        def grad(dy):
            return tf.identity(dy)
        return _summed(value, group, kind), grad
    return g(x)
