"""`hvdtrain export` as a user runs it: a trained digits run written as a SavedModel and as TFLite files (float and
dynamic-range quantized), each checked against the Keras model before it is put in place, and each loading in a plain
TensorFlow process (no hvdtrain, no Horovod) with the Keras model's predictions. Bad requests stop with one line and
leave nothing behind."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, env, hvdtrain, output

PLAIN = """
import sys, numpy as np, keras, tensorflow as tf
assert "hvdtrain" not in sys.modules and "horovod" not in sys.modules
run, fmt, path = sys.argv[1:4]
x = np.load(sys.argv[4])
expected = keras.saving.load_model(run + "/model.keras").predict(x, verbose=0)
if fmt == "saved_model":
    loaded = tf.saved_model.load(path)   # held: its functions need it alive
    got = loaded.serve(tf.constant(x)).numpy()
else:
    interpreter = tf.lite.Interpreter(model_path=path)
    entry = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(entry["index"], list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(entry["index"], x)
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
print(float(np.max(np.abs(got - expected))), float(np.mean(got.argmax(-1) == expected.argmax(-1))))
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "digits"
    proc = hvdtrain(["train", "--config", str(REPO / "configs/digits.yaml"), f"--trainer.run_dir={run}",
                     "--trainer.epochs=5", "--trainer.progress=none"])
    assert proc.returncode == 0, output(proc)
    return run


def export(run, *args):
    return hvdtrain(["export", str(run), *args])


def in_plain_tensorflow(run, fmt: str, path, tmp_path) -> tuple[float, float]:
    from hvdtrain.config import load_config
    from hvdtrain.inference.export import held_out
    x = held_out(load_config(run / "config.yaml"), 1000)[1].astype(np.float32)   # the run's own test images
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([sys.executable, "-c", PLAIN, str(run), fmt, str(path), str(tmp_path / "x.npy")],
                          capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    difference, same_class = proc.stdout.split()[-2:]
    return float(difference), float(same_class)


@pytest.mark.parametrize("fmt,quantize,name", [("saved_model", None, "saved_model"), ("tflite", None, "model.tflite"),
                                               ("tflite", "dynamic", "model-dynamic.tflite")])
def test_export_writes_a_checked_model_that_plain_tensorflow_serves(run, tmp_path, fmt, quantize, name):
    report = tmp_path / "report.json"
    proc = export(run, "--format", fmt, *(["--quantize", quantize] if quantize else []), "--report", str(report))
    assert proc.returncode == 0, output(proc)
    path = run / "export" / name
    numbers = json.loads(report.read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert numbers["output"] == str(path) and path.exists() and numbers["examples"] == 360 and numbers["split"] == "test"
    assert numbers["keras_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-9)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[hvdtrain]")]
    assert lines[-1] == (f"[hvdtrain] agrees with the Keras model on 360 test examples: largest difference "
                         f"{numbers['largest_difference']:.2e}; accuracy {numbers['keras_accuracy']:.4f} (Keras), "
                         f"{numbers['exported_accuracy']:.4f} (exported)")
    assert not [p for p in (run / "export").iterdir() if p.name.startswith(".")]   # no temporary left
    difference, same_class = in_plain_tensorflow(run, fmt, path, tmp_path)
    if quantize:   # int8 weights (about a quarter of float32's bytes): outputs move a little, classes hardly
        import keras
        assert numbers["bytes"] < 0.35 * 4 * keras.saving.load_model(run / "model.keras").count_params()
        assert difference < 0.1 and same_class >= 0.97
        assert numbers["keras_accuracy"] - numbers["exported_accuracy"] <= 0.02
    else:
        assert difference <= 1e-5 and same_class == 1.0 and numbers["largest_difference"] <= 1e-5
        assert numbers["exported_accuracy"] == numbers["keras_accuracy"]


def test_bad_exports_stop_with_one_line_and_write_nothing(run, tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((run / "config.yaml").read_text())
    cases = {
        (str(unfinished), "--format", "tflite"):
            f"run directory {unfinished} has no model.keras (written when training completes); finish the run first: "
            f"hvdtrain train --trainer.run_dir={unfinished} resumes it",
        (str(tmp_path / "nowhere"), "--format", "tflite"):
            f"run directory {tmp_path / 'nowhere'} does not exist; pass the trainer.run_dir of a `hvdtrain train` run",
        (str(run), "--format", "saved_model", "--quantize", "dynamic", "--output", str(tmp_path / "sm")):
            "--quantize dynamic applies to --format tflite (a SavedModel keeps float weights)",
    }
    for args, message in cases.items():
        proc = hvdtrain(["export", *args])
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == f"hvdtrain: error: {message}", output(proc)
    assert not (unfinished / "export").exists() and not (tmp_path / "sm").exists()


def test_an_export_that_disagrees_is_refused():
    from hvdtrain.errors import UserError
    from hvdtrain.inference.export import Agreement, _check
    _check(Agreement("test", 360, 4e-3, 0.975, 0.960), "dynamic", "tflite")   # within 0.02 accuracy: kept
    with pytest.raises(UserError, match=r"^the exported tflite \(dynamic quantization\) does not agree with the Keras "
                                        r"model on 360 test examples: largest difference 4.00e-03; accuracy 0.9750 "
                                        r"\(Keras\), 0.9000 \(exported\); nothing was written"):
        _check(Agreement("test", 360, 4e-3, 0.975, 0.900), "dynamic", "tflite")
    with pytest.raises(UserError, match=r"^the exported saved_model does not agree"):
        _check(Agreement("test", 360, 2e-3, 0.975, 0.975), None, "saved_model")


def test_a_failed_check_writes_nothing_and_keeps_the_earlier_export(run, tmp_path, monkeypatch):
    from hvdtrain.errors import UserError
    from hvdtrain.inference import export as exporting
    earlier = tmp_path / "kept.tflite"
    assert export(run, "--format", "tflite", "--output", str(earlier)).returncode == 0
    before = earlier.read_bytes()
    monkeypatch.setattr(exporting, "FLOAT_TOLERANCE", -1.0)   # no export can agree now
    for output in (earlier, tmp_path / "new" / "folder" / "m.tflite"):
        with pytest.raises(UserError, match=r"^the exported tflite does not agree with the Keras model on 360 test "
                                            r"examples: .*; nothing was written"):
            exporting.export(run, "tflite", None, output)
    assert earlier.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["kept.tflite"]


def test_an_output_that_is_not_an_earlier_export_is_never_replaced(run, tmp_path):
    (tmp_path / "notes").mkdir()
    cases = {("--format", "saved_model", "--output", str(tmp_path / "notes")):
             f"--output {tmp_path / 'notes'} exists and is not a SavedModel directory from an earlier export; choose a "
             "new path (only an earlier export is replaced)",
             ("--format", "tflite", "--output", str(run / "config.yaml")):
             f"--output {run / 'config.yaml'} exists and is not a .tflite file from an earlier export; choose a new "
             "path (only an earlier export is replaced)",
             ("--format", "saved_model", "--output", str(run.parent)):
             f"--output {run.parent} would replace the run directory {run}; choose a path for the export, e.g. the "
             "default RUN_DIR/export/..."}
    for args, message in cases.items():
        proc = export(run, *args)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == f"hvdtrain: error: {message}", output(proc)
    assert (run / "config.yaml").is_file() and (tmp_path / "notes").is_dir() and (run / "model.keras").is_file()
