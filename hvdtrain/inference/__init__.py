"""Evaluation and prediction with a trained model, on any number of ranks, equal to one process bit for bit: the
single-process run's batches are dealt whole to the ranks (data.sharding.dealt_batches).

  evaluate.py  exact metrics from per-batch sums added in batch order (also the trainer's per-epoch evaluation)
  predict.py   scoring whole batches dealt in turn, written once in input order (files), or gathered (the Keras API)
  formats.py   .npy / .csv / .jsonl
  run.py       loading a trained run: config, model, checkpoint (whatever strategy wrote it)
The commands that use them are hvdtrain/commands/predict.py and evaluate.py; which inputs they read, data/inputs.py.
"""
from hvdtrain.inference.evaluate import Evaluator, exact_metrics
from hvdtrain.inference.predict import OrderedOutput, predict_ordered, predict_to_file, write_predictions

__all__ = ["Evaluator", "OrderedOutput", "exact_metrics", "predict_ordered", "predict_to_file", "write_predictions"]
