"""Runs inside each rank: `hvdtrain` commands as commands_worker.py runs them, and `restore` jobs: a run directory's
latest checkpoint restored through the Keras API (hk.Run.resume) into the digits job's model compiled with
hk.distribute(Adam, shard_state=S), then this rank's optimizer state as it holds it written to
OUT_DIR/<name>-rank<R>.npz (its slots) and .json (its range, scalars and the position resumed at).

usage: sharded_worker.py JOBS.json OUT_DIR
JOBS.json: [{"name", "argv"} | {"name", "restore": RUN_DIR, "shard_state": S, "global_batch": B, "steps": N}, ...]
"""
import json
import sys
from pathlib import Path

from commands_worker import captured, run, work


def restore(job: dict) -> dict:
    import keras
    import numpy as np

    import hvdtrain.keras as hk
    from hvdtrain import backend, models
    from hvdtrain.config import ModelConfig
    result = {}
    with captured(result):
        world = hk.init()
        model = models.build_model(ModelConfig(), (8, 8, 1), 10)   # the digits job's model, as hvdtrain train builds it
        model.compile(hk.distribute(keras.optimizers.Adam(0.001), shard_state=job["shard_state"]),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
        run_ = hk.Run(job["restore"], world, epochs=2, steps_per_epoch=job["steps"],
                      global_batch_size=job["global_batch"], handle_signals=False)
        position = run_.resume(model)
        state = backend.optimizer_state(model.optimizer, model.trainable_variables)
        out = Path(sys.argv[2]) / f"{job['name']}-rank{world.rank}"
        np.savez(f"{out}.npz", **state.slots)
        Path(f"{out}.json").write_text(json.dumps({"range": [state.lo, state.hi], "scalars": state.scalars,
                                                   "global_step": position.global_step}))
        result["code"] = 0
    keras.backend.clear_session()
    return result


work(lambda job: restore(job) if "restore" in job else run(job))
