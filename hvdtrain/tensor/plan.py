"""Which layers a model splits (parallel.tensor_plan): the user's plan, checked against the model, or the automatic
one. A plan maps layer names to

  column   a Dense whose output units are split; its output must feed a row layer through elementwise activations
           only (the MLP block Dense -> activation -> Dense: no communication between the two)
  row      a Dense whose input units are split: the partner of the column layer before it
  heads    a MultiHeadAttention split by heads
  vocab    an Embedding split by rows (its vocabulary)

Automatic: every Dense -> (activations) -> Dense pair in running order and every MultiHeadAttention whose sizes T
divides. Refusals are one line each: an unknown name, a layer of another kind, a column layer without its row
partner (or a row layer without its column layer), sizes T does not divide, a layer called more than once.
"""
from __future__ import annotations

import difflib

from hvdtrain.config import ConfigError

ELEMENTWISE = ("Activation", "ReLU", "LeakyReLU", "ELU")   # layers that keep a column layer's slice a slice
_NOT_ELEMENTWISE = ("softmax", "log_softmax")


class Calls:
    """A model's graph as layer calls in running order: who reads each tensor."""

    def __init__(self, model):
        import keras
        functional = getattr(model, "_functional", None) or model   # a Sequential keeps a functional graph inside
        self.model = model
        self.layers = [op for op in functional.operations if not isinstance(op, keras.layers.InputLayer)]
        nodes = _nodes_of(functional.outputs)
        self.calls = {id(layer): [n for n in nodes if n.operation is layer] for layer in self.layers}
        self.readers: dict = {}
        for layer in self.layers:
            for node in self.calls[id(layer)]:
                for tensor in node.input_tensors:
                    self.readers.setdefault(id(tensor), []).append(layer)
        self.outputs = {id(t) for t in functional.outputs}

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def partner(self, column):
        """The Dense a column layer's output feeds through elementwise layers only, else (None, why not)."""
        if _activation_name(column) in _NOT_ELEMENTWISE:
            return None, f"its activation {_activation_name(column)} mixes the units it would split"
        layer = column
        while True:
            out = self.calls[id(layer)][0].output_tensors[0]
            readers = self.readers.get(id(out), [])
            if id(out) in self.outputs or len(readers) != 1:
                where = "is the model's output" if id(out) in self.outputs else \
                    f"goes to {_listed([r.name for r in readers]) or 'no layer'}"
                return None, f"its output{'' if layer is column else ' after ' + repr(layer.name)} {where}"
            layer = readers[0]
            if type(layer).__name__ == "Dense" and len(self.calls[id(layer)]) == 1:
                return layer, ""
            if not _elementwise(layer) or len(self.calls[id(layer)]) != 1:
                return None, f"its output goes to {layer.name!r} ({type(layer).__name__}), not through activations " \
                             "to a Dense"


def _nodes_of(outputs) -> list:
    """Every node (layer call) the outputs depend on."""
    seen, stack, nodes = set(), list(outputs), []
    while stack:
        history = getattr(stack.pop(), "_keras_history", None)
        if history is None:
            continue
        node = history.operation._inbound_nodes[history.node_index]
        if id(node) not in seen:
            seen.add(id(node))
            nodes.append(node)
            stack.extend(node.input_tensors)
    return nodes


def _activation_name(layer) -> str:
    return getattr(getattr(layer, "activation", None), "__name__", "")


def _elementwise(layer) -> bool:
    return type(layer).__name__ in ELEMENTWISE and _activation_name(layer) not in _NOT_ELEMENTWISE


def _listed(names) -> str:
    return ", ".join(repr(n) for n in names)


def automatic(model, tensor: int) -> dict:
    """Every MultiHeadAttention whose heads T divides, every Dense -> (activations) -> Dense pair whose hidden units T
    divides, in running order; refused in one line when the model has none."""
    calls, plan = Calls(model), {}
    for layer in calls.layers:
        if layer.name in plan or len(calls.calls[id(layer)]) != 1:
            continue
        kind = type(layer).__name__
        if kind == "MultiHeadAttention" and layer.num_heads % tensor == 0:
            plan[layer.name] = "heads"
        elif kind == "Dense" and layer.units % tensor == 0:
            row, _ = calls.partner(layer)
            if row is not None and row.name not in plan:
                plan.update({layer.name: "column", row.name: "row"})
    if not plan:
        raise ConfigError(f"parallel.tensor_parallel={tensor}: model {model.name!r} has no layer to split (no "
                          f"MultiHeadAttention whose heads {tensor} divides, no Dense -> Dense pair whose hidden units "
                          f"{tensor} divides); name its layers in parallel.tensor_plan or set parallel.tensor_parallel=1")
    return plan


def checked(model, plan: dict, tensor: int) -> dict:
    """The user's plan, refused in one line where the model cannot follow it."""
    calls = Calls(model)
    layers = {layer.name: layer for layer in calls.layers}
    for name, kind in plan.items():
        if name not in layers:
            close = difflib.get_close_matches(name, list(layers), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"parallel.tensor_plan: model {model.name!r} has no layer {name!r}{hint}; its layers "
                              f"are {', '.join(layers)}")
        layer = layers[name]
        _check_kind(name, kind, layer)
        if len(calls.calls[id(layer)]) != 1:
            raise ConfigError(f"parallel.tensor_plan: layer {name!r} is called {len(calls.calls[id(layer)])} times; "
                              "a split layer must be called once (no shared layers)")
        _check_divides(name, kind, layer, tensor)
    for name, kind in plan.items():
        if kind == "column":
            row, why = calls.partner(layers[name])
            if row is None or plan.get(row.name) != "row":
                reason = why if row is None else f"its partner {row.name!r} is not planned as row"
                raise ConfigError(f"parallel.tensor_plan: column layer {name!r} has no row partner ({reason}); a "
                                  "column layer's output must feed a Dense planned as row, through activations only")
    partnered = {calls.partner(layers[n])[0].name for n, k in plan.items() if k == "column"}
    for name, kind in plan.items():
        if kind == "row" and name not in partnered:
            raise ConfigError(f"parallel.tensor_plan: row layer {name!r} has no column layer before it; plan the Dense "
                              f"whose output it reads (through activations only) as column")
    return dict(plan)


_LAYER_OF = {"column": "Dense", "row": "Dense", "heads": "MultiHeadAttention", "vocab": "Embedding"}


def _check_kind(name: str, kind: str, layer) -> None:
    if type(layer).__name__ != _LAYER_OF[kind]:
        raise ConfigError(f"parallel.tensor_plan: {name!r} is a {type(layer).__name__}, and {kind} splits a "
                          f"{_LAYER_OF[kind]} (column and row: Dense; heads: MultiHeadAttention; vocab: Embedding)")


def _check_divides(name: str, kind: str, layer, tensor: int) -> None:
    size, what = {"column": (lambda: layer.units, "output units"),
                  "row": (lambda: int(layer.kernel.shape[0]), "input units"),
                  "heads": (lambda: layer.num_heads, "heads"),
                  "vocab": (lambda: layer.input_dim, "rows (vocabulary)")}[kind]
    if size() % tensor:
        raise ConfigError(f"parallel.tensor_plan: layer {name!r} has {size()} {what}, which "
                          f"parallel.tensor_parallel={tensor} does not divide; split layers whose sizes it divides")


def resolve(model, plan: dict, tensor: int) -> dict:
    """The plan this model trains with: the user's checked, or the automatic one."""
    return checked(model, plan, tensor) if plan else automatic(model, tensor)
