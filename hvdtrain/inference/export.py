"""A trained run's model.keras for serving and the edge: a TensorFlow SavedModel or a TFLite file (optionally with
dynamic-range quantization: int8 weights, float computation), checked against the Keras model on the run's own
held-out data before it is put in place, so a wrong export is never left behind.

The check runs both models on the same examples and compares their outputs: an unquantized export must agree to
float rounding (largest difference <= 1e-4 of the outputs' scale); a quantized one, whose outputs move by design, must
keep the accuracy within 0.02 (classification) or its outputs within 5% of their scale.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hvdtrain import config
from hvdtrain.errors import UserError
from hvdtrain.rundir import make_temp_dir
from hvdtrain.tasks import Task
from hvdtrain.world import World

FORMATS = ("saved_model", "tflite")
FLOAT_TOLERANCE, QUANTIZED_TOLERANCE, QUANTIZED_ACCURACY_DROP = 1e-4, 0.05, 0.02


@dataclass
class Agreement:
    split: str
    examples: int
    largest_difference: float
    keras_accuracy: float | None
    exported_accuracy: float | None
    scale: float = 1.0   # the largest |output| of the Keras model, at least 1

    def describe(self) -> str:
        accuracy = "" if self.keras_accuracy is None else \
            f"; accuracy {self.keras_accuracy:.4f} (Keras), {self.exported_accuracy:.4f} (exported)"
        return (f"on {self.examples} {self.split} examples: largest difference {self.largest_difference:.2e}"
                f"{accuracy}")


def default_output(run: Path, fmt: str, quantize: str | None) -> Path:
    return run / "export" / ("saved_model" if fmt == "saved_model" else f"model{'-' + quantize if quantize else ''}.tflite")


def model_file(run: Path) -> Path:
    """The run's model.keras, or a one-line error saying why there is none."""
    if not (run / "config.yaml").is_file():
        what = "has no config.yaml" if run.is_dir() else "does not exist"
        raise UserError(f"run directory {run} {what}; pass the trainer.run_dir of a `hvdtrain train` run")
    if not (run / "model.keras").is_file():
        raise UserError(f"run directory {run} has no model.keras (written when training completes); finish the run "
                        f"first: hvdtrain train --trainer.run_dir={run} resumes it")
    return run / "model.keras"


def export(run: Path, fmt: str, quantize: str | None, output: Path, overrides=(), limit: int = 1000) -> Agreement:
    """Export and check; the result appears at `output` only if the check passes (replacing an earlier export)."""
    import keras
    if quantize and fmt != "tflite":
        raise UserError(f"--quantize {quantize} applies to --format tflite (a SavedModel keeps float weights)")
    model = keras.saving.load_model(model_file(run))
    check_output(output, fmt, run)
    cfg = config.load_config(run / "config.yaml", overrides)
    task = Task.from_config(cfg.data, cfg.trainer.top_k)
    split, x, y = held_out(cfg, limit)
    created = _outermost_missing(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(output.parent)
    try:
        saved = tmp / "saved_model"
        _save(model, saved)
        if fmt == "saved_model":
            exported, built = _saved_model_outputs(saved, x), saved
        else:
            content = _tflite(saved, quantize)
            exported, built = _tflite_outputs(content, x), tmp / output.name
            built.write_bytes(content)
        agreement = _compare(task, split, np.asarray(model.predict(x, batch_size=256, verbose=0)), exported, y)
        _check(agreement, quantize, fmt)
        _put_in_place(built, output, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:   # nothing left behind, not even the folders made for it
            shutil.rmtree(created, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return agreement


def check_output(output: Path, fmt: str, run: Path) -> None:
    """Refuse an output that would replace anything but an earlier export of the same kind (never the run itself)."""
    resolved, run_dir = output.resolve(), run.resolve()
    if resolved == run_dir or run_dir.is_relative_to(resolved):
        raise UserError(f"--output {output} would replace the run directory {run}; choose a path for the export, "
                        "e.g. the default RUN_DIR/export/...")
    if not output.exists():
        return
    earlier = (output / "saved_model.pb").is_file() if fmt == "saved_model" else         output.is_file() and output.suffix == ".tflite"
    if not earlier:
        kind = "a SavedModel directory" if fmt == "saved_model" else "a .tflite file"
        raise UserError(f"--output {output} exists and is not {kind} from an earlier export; choose a new path "
                        "(only an earlier export is replaced)")


def _outermost_missing(path: Path) -> Path | None:
    """The outermost directory that creating `path`'s parent would make (None: it exists)."""
    missing = None
    for parent in path.absolute().parents:   # innermost first
        if parent.exists():
            break
        missing = parent
    return missing


def _put_in_place(built: Path, output: Path, tmp: Path) -> None:
    """Rename into place; an earlier export is moved aside first and removed after, so one of them always exists."""
    aside = tmp / "earlier"
    if output.exists():
        os.replace(output, aside)
    os.replace(built, output)


def held_out(cfg, limit: int) -> tuple[str, np.ndarray, np.ndarray]:
    """Up to `limit` examples of the run's test split (its training split if it has none), in order."""
    from hvdtrain.data import open_source
    source = open_source(cfg.data)
    split = "test" if source.has_split("test") else "train"
    world = World(rank=0, size=1)
    source.adopt(split, [source.validate(world, split)])
    xs, ys, seen = [], [], 0
    for x, y in source.eval_share(world, split, 256).dataset:
        xs.append(x.numpy())
        ys.append(y.numpy())
        seen += len(xs[-1])
        if seen >= limit:
            break
    return split, np.concatenate(xs)[:limit], np.concatenate(ys)[:limit]


def _save(model, path: Path) -> None:
    from hvdtrain.runtime import keras_major
    if keras_major() >= 3:
        model.export(str(path), format="tf_saved_model", verbose=False)
    else:
        with contextlib.redirect_stdout(io.StringIO()):   # Keras 2 lists the endpoints and their captures
            model.export(str(path))


def _saved_model_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    import tensorflow as tf
    loaded = tf.saved_model.load(str(path))   # held while its signature runs
    outputs = loaded.signatures["serving_default"](tf.constant(x, tf.float32))
    return np.asarray(next(iter(outputs.values())))


def _tflite(saved: Path, quantize: str | None) -> bytes:
    import tensorflow as tf
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
    if quantize == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]   # weights to int8, computation in float
    from hvdtrain.errors import first_line
    from hvdtrain.runtime import without_lines
    try:
        with without_lines(""):   # the converter's op summary (TF 2.15 prints it); a failure raises with its reason
            return converter.convert()
    except Exception as exc:   # e.g. an op TFLite has no kernel for
        raise UserError(f"TFLite cannot convert this model: {first_line(exc)}; export --format saved_model "
                        "instead") from None


def _tflite_outputs(content: bytes, x: np.ndarray) -> np.ndarray:
    import tensorflow as tf
    from hvdtrain.runtime import without_lines
    # TF 2.21 points to ai_edge_litert's interpreter, the same runtime; the check works with TensorFlow's own.
    with without_lines("Created TensorFlow Lite XNNPACK delegate"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*tf.lite.Interpreter is deprecated")
        interpreter = tf.lite.Interpreter(model_content=content)
        entry, result = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        interpreter.resize_tensor_input(entry["index"], list(x.shape))
        interpreter.allocate_tensors()
        interpreter.set_tensor(entry["index"], x.astype(np.float32))
        interpreter.invoke()
        return np.asarray(interpreter.get_tensor(result["index"]))


def _compare(task: Task, split: str, keras_out: np.ndarray, exported: np.ndarray, y: np.ndarray) -> Agreement:
    if keras_out.shape != exported.shape:
        raise UserError(f"the exported model's outputs have shape {list(exported.shape)}, the Keras model's "
                        f"{list(keras_out.shape)}; this is a bug, please report it")
    accuracies = (None, None)
    if task.kind == "classification":
        labels = y.reshape(-1)
        accuracies = tuple(float(np.mean(np.argmax(out, axis=-1) == labels)) for out in (keras_out, exported))
    return Agreement(split, len(y), float(np.max(np.abs(keras_out - exported))), *accuracies,
                     scale=max(1.0, float(np.max(np.abs(keras_out)))))


def _check(agreement: Agreement, quantize: str | None, fmt: str) -> None:
    """Tolerances relative to the outputs' scale (at least 1: probabilities are compared as they are)."""
    a = agreement
    if quantize and a.keras_accuracy is not None:
        ok = a.keras_accuracy - a.exported_accuracy <= QUANTIZED_ACCURACY_DROP
    else:
        ok = a.largest_difference <= (QUANTIZED_TOLERANCE if quantize else FLOAT_TOLERANCE) * a.scale
    if not ok:
        raise UserError(f"the exported {fmt}{' (' + quantize + ' quantization)' if quantize else ''} does not agree "
                        f"with the Keras model {a.describe()}; nothing was written (try without --quantize)")


def report(agreement: Agreement, output: Path, fmt: str, quantize: str | None) -> dict:
    size = sum(f.stat().st_size for f in output.rglob("*") if f.is_file()) if output.is_dir() else output.stat().st_size
    return {"format": fmt, "quantize": quantize, "output": str(output), "bytes": size, **asdict(agreement)}
