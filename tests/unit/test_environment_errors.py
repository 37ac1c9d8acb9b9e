"""Environment problems a user can hit before any training: clear errors, not crashes."""
import subprocess
import sys

import pytest

from conftest import env
from hvdtrain.errors import UserError


def run_python(code: str, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**env(), **extra_env}, capture_output=True, text=True,
                          timeout=120)


def test_the_installed_stack_is_recognised_and_a_mismatched_keras_is_refused_with_the_fix():
    ok = run_python("from hvdtrain import runtime, backend; print(runtime.stack(), '|', backend.integration())")
    stack, integration = ok.stdout.strip().split(" | ")
    assert stack in ("tf2.21", "tf2.15"), ok.stderr
    assert ("own Keras 3 layer" in integration) == (stack == "tf2.21")
    # TensorFlow 2.15 with Keras 3 (e.g. `pip install keras` into a 2.15 environment):
    wrong = run_python("import tensorflow as tf, keras\n"
                       "tf.__version__, keras.__version__ = '2.15.1', '3.1.0'\n"
                       "from hvdtrain import runtime\n"
                       "try:\n    runtime.stack()\nexcept Exception as e:\n    print(type(e).__name__, e)")
    assert "UserError TensorFlow 2.15 needs Keras 2.15 but Keras 3.1.0 is installed: pip install 'keras>=2.15,<2.16'" \
        in wrong.stdout, wrong.stderr


def test_legacy_keras_on_current_tensorflow_is_refused_with_the_reason():
    proc = run_python("import tensorflow as tf\n"
                      "tf.__version__ = '2.21.0'\n"
                      "from hvdtrain import runtime\n"
                      "try:\n    print(runtime.stack())\nexcept Exception as e:\n    print(type(e).__name__, e)",
                      TF_USE_LEGACY_KERAS="1")
    assert "UserError TF_USE_LEGACY_KERAS=1 selects tf-keras (Keras 2), whose Horovod layer does not work on " \
           "TensorFlow 2.21.0 (horovod issue 4290); unset TF_USE_LEGACY_KERAS" in proc.stdout, proc.stdout + proc.stderr


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


def test_tensorflow_start_up_banners_are_hidden_but_other_lines_pass():
    proc = run_python("from hvdtrain import runtime\nruntime.import_tensorflow()\n"
                      "import os\nos.write(2, b'a real warning\\n')\n")
    assert "oneDNN custom operations" not in proc.stderr and "absl::InitializeLog" not in proc.stderr
    assert "a real warning" in proc.stderr


def test_a_missing_extra_is_named_with_the_line_that_installs_it():
    from hvdtrain.errors import require
    with pytest.raises(UserError) as err:
        require("hvdtrain_no_such_module", "sweep", "hvdtrain sweep")
    assert str(err.value) == ('hvdtrain sweep needs hvdtrain_no_such_module, which is not installed here: '
                              'pip install "hvdtrain[sweep]"')
    assert require("json", "bench", "x").dumps([1]) == "[1]"
