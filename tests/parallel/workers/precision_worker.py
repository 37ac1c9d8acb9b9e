"""Runs inside each rank: train with hvdtrain's Trainer under a mixed-precision policy, then write what this rank
ended with: its weights, the compute/variable dtypes of its layers, the loss scaler's state and which of its own
training steps held an example whose |label| exceeds 1e5 (the overflow test plants one).

usage: precision_worker.py OUT_DIR [hvdtrain config overrides...]
"""
import json
import sys
from pathlib import Path

import numpy as np

from hvdtrain.config import load_config
from hvdtrain.trainer import Trainer

out = Path(sys.argv[1])
trainer = Trainer(load_config(None, sys.argv[2:]))
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
import keras  # noqa: E402  (imported quietly by the trainer by now)

np.savez(out / f"weights-rank{rank}.npz", *model.get_weights())
(out / f"rank{rank}.json").write_text(json.dumps({
    "summary": summary, "scaler": scaler, "huge_steps": huge_steps, "keras": int(keras.__version__.split(".")[0]),
    "compute_dtypes": sorted({str(layer.compute_dtype) for layer in model.layers if layer.weights}),
    "variable_dtypes": sorted({str(w.dtype).replace("<dtype: '", "").replace("'>", "") for w in model.weights}),
    "history": trainer.session.progress.history}))
