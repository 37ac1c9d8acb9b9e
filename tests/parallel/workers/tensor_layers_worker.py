"""Runs inside each rank (2 ranks, T = 2): every split layer against the unsplit layer, Megatron's way
(megatron/mpu/tests/test_layers.py): every rank builds the whole layer from one seed and keeps its slice
(tensor.shard.split_model); loss = sum(Y * R) for a fixed random R; the output, the input gradients and each weight's
gradient (this rank's slice of the whole layer's) are compared, and the bytes the split layer handed to Horovod.

usage: tensor_layers_worker.py OUT_DIR      writes OUT_DIR/rank<R>.json: per case, the largest relative errors and
                                            the bytes counted (traffic.py, kind tensor)
"""
import json
import sys
from pathlib import Path

import numpy as np

from hvdtrain import world as worlds
from hvdtrain.config import RuntimeConfig

world = worlds.start(RuntimeConfig(seed=3, deterministic=True), tensor=2)

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from hvdtrain.backend import traffic  # noqa: E402
from hvdtrain.tensor.shard import slice_of, split_axis, split_model  # noqa: E402

L = keras.layers
BATCH, TOKENS, WIDTH = 4, 6, 16


def mlp():
    x = keras.Input((TOKENS, WIDTH))
    return [x], L.Dense(WIDTH, name="row")(L.Dense(4 * WIDTH, activation="gelu", name="column")(x)), \
        {"column": "column", "row": "row"}


def self_attention():
    x = keras.Input((TOKENS, WIDTH))
    return [x], L.MultiHeadAttention(4, 8, name="attention")(x, x), {"attention": "heads"}


def cross_attention():
    q, kv = keras.Input((TOKENS, WIDTH)), keras.Input((TOKENS + 2, WIDTH))
    return [q, kv], L.MultiHeadAttention(4, 8, use_bias=True, name="attention")(q, kv), {"attention": "heads"}


def vocabulary():
    ids = keras.Input((TOKENS,), dtype="int32")
    return [ids], L.Embedding(12, WIDTH, name="embedding")(ids), {"embedding": "vocab"}


CASES = {"column+row": mlp, "heads (self-attention)": self_attention, "heads (cross-attention)": cross_attention,
         "vocab": vocabulary}


def relative(found, expected) -> float:
    found, expected = np.asarray(found), np.asarray(expected)
    return float(np.max(np.abs(found - expected)) / max(np.max(np.abs(expected)), 1e-30))


def forward_backward(model, inputs, r):
    @tf.function
    def step():
        with tf.GradientTape() as tape:
            floats = [x for x in inputs if x.dtype.is_floating]
            tape.watch(floats)
            y = model(inputs, training=True)
            loss = tf.reduce_sum(y * r)
        return y, tape.gradient(loss, floats + list(model.trainable_weights))
    y, grads = step()
    return y.numpy(), [g.numpy() if not isinstance(g, tf.IndexedSlices) else tf.convert_to_tensor(g).numpy()
                       for g in grads]


def case(build) -> dict:
    keras.utils.set_random_seed(11)   # the same whole layer on every rank
    inputs, output, plan = build()
    whole = keras.Model(inputs, output)
    split = split_model(whole, plan, world.tensor, world.tensor_rank, world.tensor_group)
    rng = np.random.default_rng(5)
    xs = [tf.constant(rng.integers(0, 12, (BATCH, *x.shape[1:])).astype("int32")) if x.dtype == "int32" else
          tf.constant(rng.standard_normal((BATCH, *x.shape[1:])).astype("float32")) for x in inputs]
    r = tf.constant(rng.standard_normal((BATCH, *output.shape[1:])).astype("float32"))
    y, grads = forward_backward(whole, xs, r)
    before = traffic.sent().get("tensor", {}).get("float32", 0)
    y_split, grads_split = forward_backward(split.model, xs, r)
    sent = traffic.sent().get("tensor", {}).get("float32", 0) - before
    floats = sum(x.dtype.is_floating for x in xs)
    whole_weights = {w.path: (w, g) for w, g in zip(whole.trainable_weights, grads[floats:])}
    kept, weights = True, {}
    for w, g in zip(split.model.trainable_weights, grads_split[floats:]):
        whole_w, whole_g = whole_weights[w.path]
        axis = split_axis(whole_w.shape, w.shape)
        kept &= bool(np.array_equal(w.numpy(), slice_of(whole_w.numpy(), axis, world.tensor, world.tensor_rank)))
        weights[w.path] = {"axis": axis, "error": relative(g, slice_of(whole_g, axis, world.tensor, world.tensor_rank))}
    return {"output": relative(y_split, y), "inputs": [relative(a, b) for a, b in zip(grads_split[:floats], grads)],
            "weights": weights, "kept_slices": kept, "tensor_bytes": int(sent), "output_bytes": int(y.nbytes),
            "input_bytes": [int(x.numpy().nbytes) for x in xs if x.dtype.is_floating],
            "split_parameters": split.parameters()[0], "whole_parameters": int(whole.count_params())}


out = Path(sys.argv[1])
(out / f"rank{world.rank}.json").write_text(json.dumps({name: case(build) for name, build in CASES.items()}))
