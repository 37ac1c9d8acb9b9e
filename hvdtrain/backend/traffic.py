"""The bytes this rank hands to Horovod and MPI, counted where they are sent (not computed from a plan), by kind and
dtype. Counts are this process's, since it started.

  gradients    the distributed optimizer's all-reduces (after fp16 compression: what is really sent)
  weights      weight averages (local SGD, batch-norm statistics, federated averaging's weighted sums)
  activations  point-to-point messages between pipeline stages in training (activations forward, their gradients
               back)
  tensor       tensor-parallel all-reduces in training (backend/tensor_ops.py: the partial outputs of split layers
               forward, the partial input gradients backward)
  evaluation   the same (stages' messages, tensor all-reduces) during evaluation and prediction
  broadcast    the start broadcast of rank 0's state
  control      agreements, metric averages, gathered objects (a few bytes each)

`communicated_bytes` in summary.json and metrics.csv is the payload: gradients + weights + activations + tensor.
Sends made inside a compiled step (the optimizer's and the split layers' all-reduces) add to an int64 variable in
the graph; the others to a Python dict. A ring all-reduce puts 2(n-1)/n of its payload on the wire; these counts are
the payload. A reduce-scatter and an all-gather (sharded optimizer state) each put (n-1)/n of their whole vector on
the wire, half an all-reduce's: each counts half its whole vector (the reduce-scatter's input, the all-gather's
output), so the two halves of a sharded step count what the all-reduce they replace counts.
"""
from __future__ import annotations

from collections import defaultdict

PAYLOAD = ("gradients", "weights", "activations", "tensor")

_counted: dict = defaultdict(int)   # (kind, dtype) -> bytes, counted in Python
_in_graph: dict = {}                # (kind, dtype) -> tf.Variable(int64), counted inside compiled steps


def count(kind: str, dtype: str, nbytes: int) -> None:
    """`nbytes` of `dtype` sent as `kind` (outside a compiled step)."""
    _counted[(kind, str(dtype))] += int(nbytes)


def count_arrays(kind: str, arrays) -> None:
    for array in arrays:
        count(kind, array.dtype.name, array.nbytes)


def count_variables(kind: str, variables) -> None:
    """The bytes of these variables (their static shapes), sent once."""
    import numpy as np
    for v in variables:
        dtype = np.dtype(str(getattr(v.dtype, "name", v.dtype)))
        count(kind, dtype.name, int(np.prod(v.shape)) * dtype.itemsize)


def count_tensors(kind: str, tensors, share: float = 1.0) -> None:
    """Inside a compiled step (or eagerly): the bytes of these tensors, added when the step runs. `share` 0.5 for a
    reduce-scatter's input or an all-gather's output (see the module docstring)."""
    import tensorflow as tf
    for tensor in tensors:
        dtype = tensor.dtype
        size = tensor.shape.num_elements()
        nbytes = tf.constant(int(size * dtype.size * share), tf.int64) if size is not None else \
            tf.cast(tf.cast(tf.size(tensor), tf.float64) * (dtype.size * share), tf.int64)
        _graph_counter(kind, dtype.name).assign_add(nbytes)


def _graph_counter(kind: str, dtype: str):
    key = (kind, dtype)
    if key not in _in_graph:
        import tensorflow as tf
        with tf.init_scope():   # made eagerly even while a step is being traced: it outlives the trace
            _in_graph[key] = tf.Variable(0, dtype=tf.int64, trainable=False, name=f"hvdtrain_sent_{kind}_{dtype}")
    return _in_graph[key]


def sent() -> dict:
    """{kind: {dtype: bytes}} sent so far by this process."""
    out: dict = defaultdict(lambda: defaultdict(int))
    for (kind, dtype), n in _counted.items():
        out[kind][dtype] += n
    for (kind, dtype), variable in _in_graph.items():
        out[kind][dtype] += int(variable.numpy())
    return {kind: dict(sorted(by_dtype.items())) for kind, by_dtype in sorted(out.items())}


def payload(counts: dict) -> int:
    """The payload bytes (gradients, weights, activations, tensor) of a `sent()` snapshot."""
    return sum(n for kind in PAYLOAD for n in counts.get(kind, {}).values())


def since(before: dict, after: dict) -> dict:
    """What was sent between two `sent()` snapshots."""
    out = {}
    for kind, by_dtype in after.items():
        diff = {dtype: n - before.get(kind, {}).get(dtype, 0) for dtype, n in by_dtype.items()}
        diff = {dtype: n for dtype, n in diff.items() if n}
        if diff:
            out[kind] = diff
    return out
