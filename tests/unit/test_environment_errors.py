"""Environment problems a user can hit before any training: clear errors, not crashes."""
import subprocess
import sys

from conftest import env


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=120)


def test_tensorflow_with_keras_3_is_refused_with_the_fix():
    proc = run_python("import tensorflow as tf; tf.__version__ = '2.16.1'\n"
                      "from hvdtrain import runtime\n"
                      "try:\n    runtime.check_versions()\nexcept Exception as e:\n    print(type(e).__name__, e)")
    assert "UserError TensorFlow 2.16.1 ships Keras 3, which Horovod 0.28.1 does not support; install tensorflow-cpu==2.15.1" in proc.stdout


def test_horovod_without_tensorflow_support_is_a_clear_error():
    # A build without TensorFlow support has no horovod/tensorflow/mpi_lib*.so: loading it raises NotFoundError.
    proc = run_python("import sys, tensorflow as tf\n"
                      "from tensorflow.python.framework import load_library\n"
                      "real = load_library.load_op_library\n"
                      "def missing(path):\n"
                      "    if 'horovod' in path:\n"
                      "        raise tf.errors.NotFoundError(None, None, path + ': cannot open shared object file')\n"
                      "    return real(path)\n"
                      "load_library.load_op_library = missing\n"
                      "from hvdtrain.cli import main\n"
                      "sys.exit(main(['train', '--trainer.epochs=1', '--trainer.run_dir=/tmp/hvdtrain-never-written']))")
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("hvdtrain: error:")]
    assert len(lines) == 1 and "Horovod" in lines[0] and "scripts/install.sh" in lines[0], proc.stderr
