"""Runs inside each rank: train with hvdtrain's Trainer under a mixed-precision policy, then write what this rank
ended with: its weights, the compute/variable dtypes of its layers, the loss scaler's state and which of its own
training steps held an example whose |label| exceeds 1e5 (the overflow test plants one). Several runs, one after
another in this process (start-up paid once).

usage: precision_worker.py JOBS.json      JOBS.json: {"OUT_DIR": [hvdtrain config overrides...], ...}
Writes OUT_DIR/rank<R>.json and OUT_DIR/weights-rank<R>.npz for each run.
"""
import json
import sys
from pathlib import Path

import numpy as np

from hvdtrain.config import load_config
from hvdtrain.trainer import Trainer


def train(out: Path, overrides: list[str]) -> None:
    trainer = Trainer(load_config(None, overrides))
    import keras  # imported quietly by the trainer by now
    summary = trainer.fit()
    model, rank = trainer.model, trainer.world.rank
    optimizer = model.optimizer
    scaler = {}
    if hasattr(optimizer, "inner_optimizer"):
        scale = optimizer.dynamic_scale if hasattr(optimizer, "dynamic_scale") else optimizer.loss_scale   # Keras 3 / 2
        scaler = {"class": type(optimizer).__name__, "scale": float(np.asarray(scale)),
                  "applied_steps": int(np.asarray(optimizer.inner_optimizer.iterations))}
    huge_steps = [step for step, (_, y) in enumerate(trainer.batches_from(0, trainer.cfg.trainer.epochs, 0))
                  if float(np.abs(np.asarray(y)).max()) > 1e5]
    np.savez(out / f"weights-rank{rank}.npz", *model.get_weights())
    (out / f"rank{rank}.json").write_text(json.dumps({
        "summary": summary, "scaler": scaler, "huge_steps": huge_steps, "keras": int(keras.__version__.split(".")[0]),
        "compute_dtypes": sorted({str(layer.compute_dtype) for layer in model.layers if layer.weights}),
        "variable_dtypes": sorted({str(w.dtype).replace("<dtype: '", "").replace("'>", "") for w in model.weights}),
        "history": trainer.session.progress.history}))
    keras.backend.clear_session()      # the next run builds its model with fresh layer names


for out_dir, overrides in json.loads(Path(sys.argv[1]).read_text()).items():
    train(Path(out_dir), overrides)
