"""What is learned: classification, multilabel or regression. Each task knows its labels, its loss and metrics, the
exact (summed) evaluation and what a prediction writes. Models output raw scores (logits, or values for regression);
the task turns them into losses and predictions.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hvdtrain.errors import DataError


@dataclass(frozen=True)
class Task:
    kind: str              # classification | multilabel | regression
    outputs: int           # classes, or regression outputs
    top_k: int = 0         # classification: also report top-k accuracy (0: off)

    @classmethod
    def from_config(cls, data_cfg, top_k: int = 0) -> "Task":
        k = top_k if data_cfg.task == "classification" and data_cfg.num_classes > top_k else 0
        return cls(data_cfg.task, data_cfg.num_classes, k)

    # ------------------------------------------------------------------ labels
    @property
    def label_shape(self) -> tuple:
        return () if self.kind == "classification" else (self.outputs,)

    def label_dtype(self):
        return np.int64 if self.kind == "classification" else np.float32

    def check_labels(self, y: np.ndarray, where: str) -> None:
        """Refuse labels this task cannot learn from, naming the first bad one."""
        if len(y) == 0:
            return
        if self.kind == "classification":
            if y.ndim != 1:
                raise DataError(f"{where}: labels have shape {list(y.shape[1:])} per example but classification needs one "
                                "integer class each; set data.task=multilabel or regression, or fix the labels")
            if y.min() < 0 or y.max() >= self.outputs:
                bad = int(y.min() if y.min() < 0 else y.max())
                raise DataError(f"{where}: label {bad} is outside [0, {self.outputs}); set data.num_classes or fix the labels")
            return
        flat = y.reshape(len(y), -1)
        if flat.shape[1] != self.outputs:
            raise DataError(f"{where}: labels have {flat.shape[1]} values per example but data.num_classes is "
                            f"{self.outputs}; set data.num_classes={flat.shape[1]} or fix the labels")
        finite = np.isfinite(flat).all(axis=1)
        if not finite.all():
            raise DataError(f"{where}: example {int(np.argmin(finite))} has a non-finite label (NaN or Inf); clean the data")
        if self.kind == "multilabel" and not np.isin(flat, (0, 1)).all():
            row = int(np.argmax(~np.isin(flat, (0, 1)).all(axis=1)))
            raise DataError(f"{where}: example {row} has a multilabel target other than 0/1; multilabel targets are 0 or 1 per class")

    def labels(self, y: np.ndarray) -> np.ndarray:
        return y.astype(np.int64).reshape(-1) if self.kind == "classification" else \
            y.astype(np.float32).reshape(len(y), self.outputs)

    # ------------------------------------------------------------------ training
    def loss(self):
        import keras
        if self.kind == "classification":
            return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        if self.kind == "multilabel":
            return keras.losses.BinaryCrossentropy(from_logits=True)
        return keras.losses.MeanSquaredError()

    def metrics(self) -> list:
        import keras
        if self.kind == "classification":
            out = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
            if self.top_k:
                out.append(keras.metrics.SparseTopKCategoricalAccuracy(k=self.top_k, name=f"top{self.top_k}_accuracy"))
            return out
        if self.kind == "multilabel":
            return [keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")]   # logits: 0 is p = 0.5
        return [keras.metrics.MeanAbsoluteError(name="mae")]

    @property
    def headline(self) -> str:
        """The metric a summary leads with (and the default sweep objective, maximised or minimised)."""
        return "mae" if self.kind == "regression" else "accuracy"

    # ------------------------------------------------------------------ exact evaluation
    def sum_names(self) -> tuple[str, ...]:
        """What an evaluation sums over all ranks; metrics are ratios of these sums (see `metrics_from_sums`)."""
        if self.kind == "classification":
            return ("loss", "correct", "topk_correct", "examples")
        return ("loss", "correct" if self.kind == "multilabel" else "abs_error", "examples", "values")

    def batch_sums(self, scores, y):
        """A traceable function of one batch: the sums named by sum_names (float64, exact when all-reduced)."""
        import tensorflow as tf
        scores = tf.cast(scores, tf.float32)
        n = tf.cast(tf.shape(scores)[0], tf.float64)
        if self.kind == "classification":
            y = tf.cast(y, tf.int64)
            loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=scores)
            correct = tf.equal(tf.argmax(scores, axis=-1), y)
            k = self.top_k or 1
            topk = tf.math.in_top_k(tf.cast(y, tf.int32), scores, k) if self.top_k else correct
            return [tf.reduce_sum(tf.cast(loss, tf.float64)), tf.reduce_sum(tf.cast(correct, tf.float64)),
                    tf.reduce_sum(tf.cast(topk, tf.float64)), n]
        y = tf.cast(tf.reshape(y, tf.shape(scores)), tf.float32)
        values = tf.cast(tf.size(scores), tf.float64)
        if self.kind == "multilabel":
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=scores), axis=-1)
            correct = tf.equal(tf.cast(scores > 0, tf.float32), y)
            return [tf.reduce_sum(tf.cast(loss, tf.float64)), tf.reduce_sum(tf.cast(correct, tf.float64)), n, values]
        error = scores - y
        loss = tf.reduce_mean(tf.square(error), axis=-1)
        return [tf.reduce_sum(tf.cast(loss, tf.float64)), tf.reduce_sum(tf.cast(tf.abs(error), tf.float64)), n, values]

    def metrics_from_sums(self, sums) -> dict:
        s = dict(zip(self.sum_names(), (float(v) for v in sums)))
        examples = int(s["examples"])
        out = {"loss": s["loss"] / max(examples, 1), "examples": examples}
        if self.kind == "classification":
            out.update(accuracy=s["correct"] / max(examples, 1), correct=int(s["correct"]))
            if self.top_k:
                out[f"top{self.top_k}_accuracy"] = s["topk_correct"] / max(examples, 1)
        elif self.kind == "multilabel":
            out["accuracy"] = s["correct"] / max(s["values"], 1)
        else:
            out["mae"] = s["abs_error"] / max(s["values"], 1)
        return out

    # ------------------------------------------------------------------ prediction
    def output_fields(self) -> tuple[str, ...]:
        """Fields `hvdtrain predict` can write, in their fixed order."""
        if self.kind == "classification":
            return ("class", "name", "probs")
        if self.kind == "multilabel":
            return ("labels", "probs")
        return ("value",)

    def default_fields(self) -> tuple[str, ...]:
        return {"classification": ("class", "probs"), "multilabel": ("labels", "probs"), "regression": ("value",)}[self.kind]

    def predictions(self, scores):
        """Traceable: raw model outputs -> {field: tensor} (class names are added outside, from the class ids)."""
        import tensorflow as tf
        scores = tf.cast(scores, tf.float32)
        if self.kind == "classification":
            return {"class": tf.argmax(scores, axis=-1), "probs": tf.nn.softmax(scores)}
        if self.kind == "multilabel":
            return {"labels": tf.cast(scores > 0, tf.int64), "probs": tf.sigmoid(scores)}
        return {"value": scores}
