"""The whole model made tensor-parallel, and back.

`split_model` rebuilds the whole model's graph with each planned layer replaced by this rank's split layer
(tensor.layers) of the same name; the other layers are the whole model's own (replicated in the tensor group). Every
slice starts from the whole model's initial weights (as Megatron's test and CPU initialisation do: the full weight,
sliced), so T ranks start where one process starts. A weight's slice lies along the one axis where the split layer's
shape differs from the whole layer's (kernel columns, rows, heads, embedding rows); a weight of the same shape
(a row layer's bias, the output projection's bias) is held whole by every rank.

`merged` puts T ranks' slices back together, for model.keras and for reading a checkpoint into the whole model.
"""
from __future__ import annotations

import contextlib

import numpy as np

from hvdtrain.tensor.layers import split_of


class SplitModel:
    """This rank's model and its split layers (`layers`: name -> split layer), each weight's split axis (`axes`: name
    -> one axis or None per weight), the plan and this rank's place in the tensor group."""

    def __init__(self, model, layers: dict, axes: dict, plan: dict, tensor: int, tensor_rank: int):
        self.model, self.layers, self.axes, self.plan = model, layers, axes, plan
        self.tensor, self.tensor_rank = tensor, tensor_rank

    def slices(self) -> dict:
        """{split layer name: its weights (NumPy)} of the split layers this rank made (with pipeline stages, its
        stage's): what it contributes to the whole model."""
        return {name: layer.get_weights() for name, layer in self.layers.items() if all(map(_made, layer.weights))}

    def merged(self, gathered: list[dict]) -> dict:
        """{split layer name: its whole weights}, from the tensor group's `slices()` in tensor-rank order (the layers
        every rank of the group holds)."""
        names = [name for name in gathered[0] if all(name in g for g in gathered)]
        return {name: merged(self.axes[name], [g[name] for g in gathered]) for name in names}

    def parameters(self) -> tuple[int, int]:
        """(parameters this rank holds in split layers, in all): the weights it made."""
        def held(weights):
            return int(sum(int(np.prod(w.shape)) for w in weights if _made(w)))
        return held(w for layer in self.layers.values() for w in layer.weights), held(self.model.weights)


def _made(weight) -> bool:
    return getattr(weight, "_value", True) is not None


def split_model(whole, plan: dict, tensor: int, tensor_rank: int, group=None, initial=None) -> SplitModel:
    """This rank's tensor-parallel model of `whole` (a functional or Sequential Keras model) for a checked `plan`
    ({layer name: column | row | heads | vocab}, see tensor.plan); `group`: the tensor group's ranks. When the whole
    model's weights were not made on this rank (deferred by Keras's stateless scope, see pipeline.build_whole), the
    split layers' weights are deferred too, each made from its slice of `initial(whole weight)` (the value the
    deferred weight would get) when its part of the model is made (pipeline.make_only)."""
    import keras
    made = {}
    deferred = not all(map(_made, whole.weights))

    def clone(layer):
        if layer.name not in plan:
            return layer   # replicated: the whole model's own layer
        made[layer.name] = (layer, split_of(layer, plan[layer.name], tensor, tensor_rank, group))
        return made[layer.name][1]
    scope = keras.StatelessScope(initialize_variables=False) if deferred else contextlib.nullcontext()
    with scope:
        model = keras.models.clone_model(whole, clone_function=clone)
    axes = {name: _start_from_whole(whole_layer, split, tensor, tensor_rank, initial)
            for name, (whole_layer, split) in made.items()}
    model.name = whole.name
    return SplitModel(model, {name: split for name, (_, split) in made.items()}, axes, dict(plan), tensor,
                      tensor_rank)


def _start_from_whole(whole_layer, split, tensor: int, tensor_rank: int, initial) -> list:
    """Each of the split layer's weights made from its slice of the whole layer's initial value; their split axes."""
    whole_weights, split_weights = whole_layer.weights, split.weights
    if [w.path.split("/")[-1] for w in whole_weights] != [w.path.split("/")[-1] for w in split_weights]:
        raise AssertionError(f"split layer {split.name} has weights {[w.path for w in split_weights]}, the whole "
                             f"layer {[w.path for w in whole_weights]}")
    axes = []
    for whole_weight, weight in zip(whole_weights, split_weights):
        axes.append(split_axis(whole_weight.shape, weight.shape))
        made = _made(whole_weight)

        def sliced(shape=None, dtype=None, source=whole_weight, made=made, axis=axes[-1]):
            value = source.numpy() if made else initial(source)
            return slice_of(np.asarray(value), axis, tensor, tensor_rank)
        if not _made(weight):   # deferred: made when its part of the model is, from its slice
            weight._initializer = sliced
        else:
            weight.assign(sliced())
    return axes


def split_axis(whole_shape, split_shape) -> int | None:
    """The axis a weight is split along (None: held whole)."""
    differ = [a for a, (w, s) in enumerate(zip(whole_shape, split_shape)) if w != s]
    if len(differ) > 1 or len(whole_shape) != len(split_shape):
        raise AssertionError(f"a split weight of shape {tuple(split_shape)} is no slice of {tuple(whole_shape)}")
    return differ[0] if differ else None


def slice_of(value: np.ndarray, axis: int | None, tensor: int, tensor_rank: int) -> np.ndarray:
    """Rank `tensor_rank`'s slice of a whole weight's value (the whole value when it is not split)."""
    if axis is None:
        return value
    return np.split(value, tensor, axis=axis)[tensor_rank]


def merged(axes: list, slices: list[list]) -> list:
    """A whole layer's weights from the T ranks' slices of it (in tensor-rank order; `axes`: each weight's)."""
    return [parts[0] if axis is None else np.concatenate(parts, axis=axis) for axis, parts in zip(axes, zip(*slices))]
