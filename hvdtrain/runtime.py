"""Everything about this process that must be settled before TensorFlow does real work: a quiet import, the
supported stack, the GPU this rank uses, threads, seeds, determinism and numeric precision. No Horovod here."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import tempfile
import warnings

from hvdtrain.backend import environment
from hvdtrain.errors import UserError

# The two stacks hvdtrain supports, and the Horovod Keras layer each trains with.
KERAS_LAYERS = {"tf2.21": "hvdtrain's own Keras 3 layer over horovod.tensorflow",
                "tf2.15": "Horovod's Keras 2 layer (horovod.tensorflow.keras)"}

# TensorFlow's start-up banners: printed by C++ at import, before any log level applies (TF 2.21 uses absl logging).
_IMPORT_NOISE = ("All log messages before absl::InitializeLog() is called", "oneDNN custom operations are on",
                 "This TensorFlow binary is optimized to use available CPU instructions",
                 "To enable the following instructions", "Unable to register cuDNN factory",
                 "Unable to register cuFFT factory", "Unable to register cuBLAS factory", "TF-TRT Warning",
                 "computation placer already registered", "could not open file to read NUMA node")

# Keras 3 imports scikit-learn (for its scikit-learn wrappers) and matplotlib (for its image gallery) whenever they are
# installed: about a fifth of a rank's start-up, for features training never uses. They are hidden while Keras is
# imported, so those two Keras features are off in a process started by hvdtrain; importing the packages later works.
_UNUSED_AT_KERAS_IMPORT = ("sklearn", "matplotlib")


def import_tensorflow():
    """Import TensorFlow without its banners (unless TF_CPP_MIN_LOG_LEVEL=0 asks for them); other lines pass."""
    logging.getLogger("tensorflow").addFilter(_drop_slow_callback_warning)
    # Keras 3 warns on every fit over a tf.data.Dataset that its default shuffle=True is ignored: noise, not news.
    warnings.filterwarnings("ignore", message="`shuffle=True` was passed, but will be ignored")
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    banners = without_lines(*_IMPORT_NOISE) if environment.tensorflow_banners_hidden() else contextlib.nullcontext()
    with banners, _hidden(_UNUSED_AT_KERAS_IMPORT):
        import tensorflow
        import keras  # noqa: F401  (imported here so that the two modules above stay hidden from it)
    return tensorflow


@contextlib.contextmanager
def _hidden(modules):
    """Modules that are not imported yet look absent for the duration (an import of them raises ImportError)."""
    hidden = [name for name in modules if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None
    try:
        yield
    finally:
        for name in hidden:
            if sys.modules.get(name, "") is None:
                del sys.modules[name]


@contextlib.contextmanager
def without_lines(*noise):
    """A block whose stderr lines containing any of `noise` are dropped: file descriptor 2 is captured (TensorFlow's
    and TFLite's C++ write banners there, outside any log level) and every other line replayed after it."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(mark in line for mark in noise)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def _drop_slow_callback_warning(record: logging.LogRecord) -> bool:
    """Keras's "callback is slow compared to the batch time": the agreement steps always trigger it."""
    return "is slow compared to the batch time" not in record.getMessage()


@functools.lru_cache(maxsize=1)
def keras_major() -> int:
    """The installed Keras's major version. The one place that asks: the rest ask this (or `stack()`)."""
    import_tensorflow()   # quietly, before Keras
    import keras
    return major(keras.__version__)


def major(version: str) -> int:
    """A version string's major number (0 if it has none): the one place a Keras version is read."""
    head = version.split(".")[0]
    return int(head) if head.isdigit() else 0


def stack() -> str:
    """The stack this process runs on ('tf2.21' or 'tf2.15'), or a UserError saying what to install."""
    tf = import_tensorflow()
    import keras
    tf_version, keras_version = tf.__version__, keras.__version__
    major_minor = tuple(int(p) for p in tf_version.split(".")[:2])
    if environment.legacy_keras_requested() and major_minor >= (2, 16):
        raise UserError("TF_USE_LEGACY_KERAS=1 selects tf-keras (Keras 2), whose Horovod layer does not work on "
                        f"TensorFlow {tf_version} (horovod issue 4290); unset TF_USE_LEGACY_KERAS: hvdtrain brings its "
                        "own Horovod layer for Keras 3")
    if major_minor >= (2, 16) and keras_major() >= 3:
        return "tf2.21"
    if major_minor == (2, 15) and keras_major() == 2:
        return "tf2.15"
    if major_minor == (2, 15):
        raise UserError(f"TensorFlow 2.15 needs Keras 2.15 but Keras {keras_version} is installed: "
                        "pip install 'keras>=2.15,<2.16' (or scripts/install.sh --stack tf2.15)")
    raise UserError(f"TensorFlow {tf_version} with Keras {keras_version} is not supported; install one of the two "
                    "stacks: scripts/install.sh (TensorFlow 2.21, Keras 3) or scripts/install.sh --stack tf2.15")


def pin_device(local_rank: int, local_size: int) -> None:
    """One GPU per rank: the GPU of this local rank, or the only visible one when the launcher already bound one GPU
    per task (srun --gpus-per-task, CUDA_VISIBLE_DEVICES per rank). CPU-only machines are left alone."""
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return
    if len(gpus) > 1 and local_size > len(gpus):
        raise UserError(f"{local_size} ranks on this node but only {len(gpus)} GPUs visible; launch one rank per GPU")
    gpu = gpus[0] if len(gpus) == 1 else gpus[local_rank]
    tf.config.experimental.set_memory_growth(gpu, True)
    tf.config.set_visible_devices(gpu, "GPU")


def configure(runtime, local_size: int) -> None:
    """Threads per rank, seeds, determinism and precision; call once per process, before building models."""
    import keras
    import tensorflow as tf
    cores = os.cpu_count() or 1
    intra = runtime.intra_op_threads or max(1, cores // max(1, local_size))
    inter = runtime.inter_op_threads or 2
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
        _set_thread_spinning(runtime.tf_thread_spinning)
    except RuntimeError:
        pass  # already initialised in this process (e.g. a second Trainer in one test): keep the first setting
    keras.utils.set_random_seed(runtime.seed)   # the same on every rank: replicas start identical
    if runtime.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(runtime.precision)


def _set_thread_spinning(enabled: bool) -> None:
    """TensorFlow's inter-op threads spin for a while after each op before they sleep. A Horovod collective's
    enqueue wakes Horovod's background thread, which then waited ~60 us for the core the spinning thread held (a
    4 KB all-reduce took ~95 us instead of ~35 us; docs/benchmarks.md). ConfigProto's disable_thread_spinning has no
    public setter in eager mode: it goes into the context's config before the context starts."""
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.eager import context
    ctx = context.context()
    if ctx._context_handle is not None:   # noqa: SLF001  (started: too late, like the thread counts above)
        raise RuntimeError("TensorFlow's context is already initialised")
    config = config_pb2.ConfigProto()
    if ctx._config is not None:           # noqa: SLF001
        config.CopyFrom(ctx._config)      # noqa: SLF001
    config.experimental.disable_thread_spinning = not enabled
    ctx._config = config                  # noqa: SLF001


def threads(runtime, local_size: int) -> tuple[int, int]:
    """(intra-op, inter-op) threads per rank that `configure` uses (for doctor)."""
    return runtime.intra_op_threads or max(1, (os.cpu_count() or 1) // max(1, local_size)), runtime.inter_op_threads or 2
