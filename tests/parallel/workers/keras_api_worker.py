"""Runs inside each rank: for each MODE, a plain Keras model whose ranks see DIFFERENT data, trained with an
optimizer from hvdtrain.keras.distribute (or, with `plain`, a plain one); writes this rank's weight digest and what
happened. All modes run one after another in this process (start-up paid once).

usage: keras_api_worker.py OUT_DIR MODE...
MODE: distributed | plain | accumulate | fp16 | sparse | mixed_float16 | sharded (shard_state=2, accumulating)
Writes OUT_DIR/<MODE>-rank<R>.json.
"""
import json
import sys
from pathlib import Path

import hvdtrain.keras as hk
import keras
import numpy as np

from hvdtrain import backend
from hvdtrain.checkpoint import weights_digest
from hvdtrain.errors import UserError


def gradients_sent() -> dict:
    """The gradient bytes this process has handed to Horovod so far, by dtype (counted where they are sent)."""
    return backend.sent_bytes().get("gradients", {})


def train(mode: str) -> dict:
    world = hk.init(precision="mixed_float16" if mode == "mixed_float16" else "float32")
    keras.utils.set_random_seed(100 + world.rank)        # different initial weights AND data per rank, on purpose
    rng = np.random.default_rng(100 + world.rank)
    if mode == "sparse":
        inputs = keras.Input((4,), dtype="int32")
        hidden = keras.layers.Flatten()(keras.layers.Embedding(50, 8)(inputs))
        x = rng.integers(0, 50, (64, 4)).astype("int32")
    else:
        inputs = keras.Input((16,))
        hidden = keras.layers.Dense(32, activation="relu")(inputs)
        x = rng.standard_normal((64, 16)).astype("float32")
    model = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    y = rng.integers(0, 3, 64)
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    result = {"rank": world.rank, "trainable_parameters": sum(int(np.prod(v.shape)) for v in model.trainable_variables)}
    before = gradients_sent()
    try:
        if mode != "plain":
            optimizer = hk.distribute(optimizer, fp16_compression=mode == "fp16",
                                      backward_passes_per_step=2 if mode in ("accumulate", "sharded") else 1,
                                      shard_state=2 if mode == "sharded" else 0)
        model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
        result["optimizer"] = type(model.optimizer).__name__
        model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=hk.callbacks(world))
        result.update(digest=weights_digest(model), steps=int(model.optimizer.iterations.numpy()),
                      gradients_sent={dtype: n - before.get(dtype, 0) for dtype, n in gradients_sent().items()
                                      if n != before.get(dtype, 0)})
    except UserError as exc:
        result["error"] = str(exc)
    return result


out = Path(sys.argv[1])
for mode in sys.argv[2:]:
    result = train(mode)
    (out / f"{mode}-rank{result['rank']}.json").write_text(json.dumps(result))
    keras.backend.clear_session()     # the next mode starts from fresh layer names and the float32 policy
