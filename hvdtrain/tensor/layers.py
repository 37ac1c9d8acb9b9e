"""The split layers: each holds this rank's slice of one layer of the whole model and computes its share of the
layer's output, joined by Megatron's f and g (backend/tensor_ops.py) over the tensor group.

  ColumnDense      a Dense's output units split (kernel columns and bias): f before it, no communication forward
  RowDense         a Dense's input units split (kernel rows): its partial products summed by g, then the bias (held
                   whole by every rank) and the activation. A column layer, elementwise activations, then a row
                   layer make an MLP block of one all-reduce forward (g) and one backward (f).
  HeadsAttention   a MultiHeadAttention's heads split: query, key and value projections (and the gate) column-parallel
                   per head, the output projection row-parallel
  VocabEmbedding   an Embedding's rows split: ids outside this rank's rows give zeros, g sums the rows

Each is the Keras layer it splits with its own config (so its computation is the whole layer's, on a slice) and a
`group` (the tensor group's ranks). Made by tensor.shard, never saved: model.keras is the whole model.
"""
from __future__ import annotations

import keras
from keras import ops
from keras.src.backend import get_keras_mask, set_keras_mask

from hvdtrain.backend.tensor_ops import copy_to_group, reduce_from_group


class ColumnDense(keras.layers.Dense):
    def __init__(self, group, **config):
        super().__init__(**config)
        self.group = group

    def call(self, inputs, training=None):
        return super().call(copy_to_group(inputs, self.group, training))


class RowDense(keras.layers.Dense):
    def __init__(self, group, **config):
        super().__init__(**config)
        self.group = group

    def call(self, inputs, training=None):
        x = reduce_from_group(ops.matmul(inputs, self.kernel), self.group, training)
        if self.bias is not None:
            x = ops.add(x, self.bias)
        return self.activation(x) if self.activation is not None else x


class _RowEinsumDense(keras.layers.EinsumDense):
    """An attention's output projection over this rank's heads: partial products summed by g, then the bias."""

    def call(self, inputs, training=None):
        x = reduce_from_group(ops.einsum(self.equation, inputs, self.kernel), self.group, training)
        if self.bias is not None:
            x = ops.add(x, self.bias)
        return self.activation(x) if self.activation is not None else x


class HeadsAttention(keras.layers.MultiHeadAttention):
    """Keras's MultiHeadAttention over num_heads / T heads (the attention of each head is the whole layer's), whose
    inputs pass f (once per distinct tensor: self-attention sends one all-reduce back) and whose output projection
    is row-parallel."""

    def __init__(self, group, **config):
        super().__init__(**config)
        self.group = group

    def _make_output_dense(self, query_shape, common_kwargs, name=None):
        dense = super()._make_output_dense(query_shape, common_kwargs, name)
        dense.__class__ = _RowEinsumDense   # the same layer and weights; only its call differs
        dense.group = self.group
        return dense

    def call(self, query, value, key=None, training=None, **kwargs):
        copies = {}

        def copied(x):
            if x is None:
                return None
            if id(x) not in copies:
                copies[id(x)] = copy_to_group(x, self.group, training)
                set_keras_mask(copies[id(x)], get_keras_mask(x))
            return copies[id(x)]
        return super().call(copied(query), copied(value), copied(key), training=training, **kwargs)


class VocabEmbedding(keras.layers.Embedding):
    """Rows [first, first + input_dim) of the whole embedding."""

    def __init__(self, group, first: int, **config):
        super().__init__(**config)
        self.group, self.first = group, first

    def call(self, inputs, training=None):
        ids = ops.cast(inputs, "int32") - self.first
        inside = ops.logical_and(ops.greater_equal(ids, 0), ops.less(ids, self.input_dim))
        rows = ops.take(self.embeddings, ops.where(inside, ids, 0), axis=0)
        rows = ops.where(ops.expand_dims(inside, -1), rows, ops.zeros_like(rows))
        return ops.cast(reduce_from_group(rows, self.group, training), self.compute_dtype)


def split_of(layer, kind: str, tensor: int, tensor_rank: int, group):
    """This rank's split layer of `layer` (its kind in a plan), with the layer's name and config; not yet built."""
    config = layer.get_config()
    if kind == "column":
        return ColumnDense(group, **{**config, "units": config["units"] // tensor})
    if kind == "row":
        return RowDense(group, **config)
    if kind == "heads":
        return HeadsAttention(group, **{**config, "num_heads": config["num_heads"] // tensor})
    rows = config["input_dim"] // tensor
    return VocabEmbedding(group, tensor_rank * rows, **{**config, "input_dim": rows})
