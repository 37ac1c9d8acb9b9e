"""Splitting a Keras model into pipeline stages at layer boundaries where exactly one tensor crosses.

The model's layers are taken in the order Keras runs them (its functional graph, topologically sorted). A cut before
layer k is valid when exactly one tensor made before k is used at or after k: the activation one stage sends to the
next. A cut inside a residual block (the block's input and its branch both cross) is not. Stage i is then the
functional sub-model from cut i's tensor to cut i+1's, sharing the layers (and weights) of the whole model.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from hvdtrain.config import ConfigError
from hvdtrain.log import counted


@dataclass(frozen=True)
class Plan:
    """Where the stages begin (layer positions, first stage at 0), and what each stage costs."""
    layers: tuple          # layer names in running order
    starts: tuple          # position of each stage's first layer
    costs: tuple           # per stage, in `unit`
    unit: str = "parameters"

    def describe(self) -> str:
        total = max(1e-12, sum(self.costs))
        parts = [f"stage {i + 1}: {self.layers[s]}..{self.layers[e - 1]} ({_amount(c, self.unit)}, {c / total:.0%})"
                 for i, (s, e, c) in enumerate(zip(self.starts, (*self.starts[1:], len(self.layers)), self.costs))]
        return "; ".join(parts)


def _amount(cost, unit: str) -> str:
    return f"{cost:,} parameters" if unit == "parameters" else f"{cost:.2f} ms forward+backward"


class Graph:
    """A single-input, single-output Keras model as a sequence of layer calls, with what crosses each gap."""

    def __init__(self, model):
        import keras
        functional = getattr(model, "_functional", None) or model   # a Sequential keeps a functional graph inside
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise ConfigError(f"parallel.pipeline_stages > 1 splits models with one input and one output; model "
                              f"{model.name!r} has {len(model.inputs)} and {len(model.outputs)}")
        self.model, self.input, self.output = model, model.inputs[0], model.outputs[0]
        self.layers = [op for op in functional.operations if not isinstance(op, keras.layers.InputLayer)]
        nodes = _nodes_of(self.output)
        produced = {id(self.input): -1}
        self.uses = []   # per layer: ids of the tensors it reads
        for k, layer in enumerate(self.layers):
            mine = [n for n in nodes if n.operation is layer]
            if len(mine) != 1:
                raise ConfigError(f"layer {layer.name!r} of model {model.name!r} is called {len(mine)} times; "
                                  "pipeline stages need each layer called once (no shared layers)")
            self.uses.append([id(t) for t in mine[0].input_tensors])
            for t in mine[0].output_tensors:
                produced[id(t)] = k
        self.produced = produced
        self.tensors = {id(t): t for n in nodes for t in (*n.input_tensors, *n.output_tensors)}
        self.tensors[id(self.input)] = self.input

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def crossing(self, k: int) -> list:
        """The tensors made before layer k and read at or after it (the model's output counts as read at the end)."""
        read_later = {t for uses in self.uses[k:] for t in uses} | {id(self.output)}
        return [self.tensors[t] for t in read_later if self.produced.get(t, len(self.layers)) < k]

    def cut_points(self) -> list[int]:
        """Positions k (1..n-1) where a new stage may begin: exactly one tensor crosses."""
        return [k for k in range(1, len(self.layers)) if len(self.crossing(k)) == 1]

    def cost(self, k: int) -> int:
        return int(sum(parameters(w) for w in self.layers[k].weights))

    def stage_models(self, starts) -> list:
        """The sub-models between the cuts, in order (each shares its layers with the whole model)."""
        import keras
        bounds = [self.input] + [self.crossing(k)[0] for k in starts[1:]] + [self.output]
        return [keras.Model(bounds[i], bounds[i + 1], name=f"{self.model.name}_stage{i + 1}")
                for i in range(len(starts))]


def _nodes_of(output) -> list:
    """Every node (layer call) the output depends on."""
    seen, stack, nodes = set(), [output], []
    while stack:
        tensor = stack.pop()
        history = getattr(tensor, "_keras_history", None)
        if history is None:
            continue
        node = history.operation._inbound_nodes[history.node_index]
        if id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        stack.extend(node.input_tensors)
    return nodes


def parameters(weight) -> int:
    n = 1
    for d in weight.shape:
        n *= int(d)
    return n


def plan(model, stages: int, split: tuple = (), layer_costs=None) -> tuple[Plan, list]:
    """(the plan, the stage models). `split`: the first layer of stages 2..P by name; empty: balanced by
    `layer_costs` (per layer, in running order: e.g. `measured_costs`'s milliseconds), else by parameters."""
    graph = Graph(model)
    names, points = graph.names, graph.cut_points()
    if len(points) < stages - 1:
        fix = f"use at most {counted(len(points) + 1, 'stage')}" if points else \
            "it cannot be split: use parallel.pipeline_stages=1"
        raise ConfigError(f"parallel.pipeline_stages={stages} needs {counted(stages - 1, 'cut')} but model "
                          f"{model.name!r} has {counted(len(points), 'place')} where exactly one tensor crosses "
                          f"({_listed(names, points)}); {fix}")
    per_layer = list(layer_costs) if layer_costs is not None else [graph.cost(k) for k in range(len(names))]
    starts = [0] + (_named(graph, split, points) if split else _balanced(per_layer, points, stages))
    costs = [sum(per_layer[s:e]) for s, e in zip(starts, (*starts[1:], len(names)))]
    unit = "parameters" if layer_costs is None else "ms"
    return Plan(tuple(names), tuple(starts), tuple(costs), unit), graph.stage_models(starts)


def measured_costs(model, batch: int, repeats: int = 3) -> list[float]:
    """Milliseconds of each layer's forward and backward pass on a batch of `batch` random examples, in running
    order: every layer timed alone (compiled, warmed up, the fastest of `repeats`) on the inputs it sees in the
    model."""
    import time

    import numpy as np
    import tensorflow as tf
    graph = Graph(model)
    nodes = {id(n.operation): n for n in _nodes_of(graph.output)}
    x = np.random.default_rng(0).standard_normal((batch, *graph.input.shape[1:])).astype(graph.input.dtype)
    values = {id(graph.input): tf.constant(x)}
    costs = []
    for layer in graph.layers:
        node = nodes[id(layer)]
        args, kwargs = node.arguments.fill_in(values)
        inputs = [values[id(t)] for t in node.input_tensors]

        @tf.function
        def step(*_):
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                out = layer(*args, **kwargs)
                total = tf.add_n([tf.reduce_sum(tf.cast(o, tf.float32)) for o in tf.nest.flatten(out)])
            return tape.gradient(total, list(layer.trainable_weights) + inputs)
        step()
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            tf.nest.map_structure(lambda g: g.numpy() if g is not None else None, step())
            best = min(best, time.perf_counter() - started)
        costs.append(1e3 * best)
        for tensor, value in zip(node.output_tensors, tf.nest.flatten(layer(*args, **kwargs))):
            values[id(tensor)] = value
    return costs


def _named(graph: Graph, split, points) -> list[int]:
    names, starts = graph.names, []
    for name in split:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"parallel.split: model {graph.model.name!r} has no layer {name!r}{hint}; its layers are "
                              f"{', '.join(names)}")
        k = names.index(name)
        if k == 0:
            raise ConfigError(f"parallel.split: {name!r} is the model's first layer, where stage 1 begins anyway; "
                              "name the first layer of stages 2..P")
        if starts and k <= starts[-1]:
            raise ConfigError(f"parallel.split: {name!r} comes before {names[starts[-1]]!r} in the model; list the "
                              "layers in the order the model runs them")
        crossing = graph.crossing(k)
        if len(crossing) != 1:
            made_by = ", ".join(sorted(_producer(t, graph) for t in crossing))
            raise ConfigError(f"parallel.split: a cut before {name!r} crosses {len(crossing)} tensors (from {made_by}); "
                              f"cut where exactly one crosses, e.g. before {_nearest(names, points, k)}")
        starts.append(k)
    return starts


def _producer(tensor, graph: Graph) -> str:
    k = graph.produced.get(id(tensor), -1)
    return "the input" if k < 0 else repr(graph.names[k])


def _nearest(names, points, k) -> str:
    near = sorted(points, key=lambda p: (abs(p - k), p))[:2]
    return " or ".join(repr(names[p]) for p in sorted(near))


def _listed(names, points) -> str:
    shown = [f"before {names[p]!r}" for p in points[:6]]
    return ", ".join(shown) + (", ..." if len(points) > 6 else "") if points else "none"


def _balanced(costs: list[int], points: list[int], stages: int) -> list[int]:
    """The cuts (P - 1 of the valid points) that minimise the costliest stage: dynamic programming over the points."""
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    ends = points + [len(costs)]

    def between(a, b):
        return prefix[b] - prefix[a]

    # best[j][e]: (the costliest of j + 1 stages covering layers [0, e), their starts); e runs over the valid ends.
    best = [{e: (between(0, e), []) for e in ends}]
    for _ in range(1, stages):
        row = {}
        for e in ends:
            options = [(max(best[-1][s][0], between(s, e)), best[-1][s][1] + [s]) for s in points if s < e and s in best[-1]]
            if options:
                row[e] = min(options, key=lambda o: o[0])
        best.append(row)
    return best[-1][len(costs)][1]
