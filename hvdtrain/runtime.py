"""Everything that must happen before TensorFlow does real work: version guard, threads, seeds, determinism."""
from __future__ import annotations

import logging
import os

from hvdtrain.errors import UserError

SUPPORTED_TF = "2.15"


def quiet_tensorflow() -> None:
    """Hide TensorFlow's C++ info banners (oneDNN, CPU features) unless the user asked for them, and Keras's
    "callback is slow" warning, which Horovod's initial broadcast at the end of batch 0 always triggers."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("tensorflow").addFilter(_drop_slow_callback_warning)


def _drop_slow_callback_warning(record: logging.LogRecord) -> bool:
    return "is slow compared to the batch time" not in record.getMessage()


def check_versions() -> None:
    """Horovod 0.28.1's Keras integration needs Keras 2, i.e. TensorFlow 2.15 or older."""
    import tensorflow as tf
    major_minor = tuple(int(p) for p in tf.__version__.split(".")[:2])
    if major_minor >= (2, 16):
        raise UserError(f"TensorFlow {tf.__version__} ships Keras 3, which Horovod 0.28.1 does not support; "
                        f"install tensorflow-cpu=={SUPPORTED_TF}.1 (scripts/install.sh does) and rebuild Horovod")
    import keras
    if not keras.__version__.startswith("2."):
        raise UserError(f"Keras {keras.__version__} is installed; hvdtrain needs Keras 2: pip install 'keras<3' "
                        f"(tensorflow-cpu=={SUPPORTED_TF}.1 brings keras 2.15)")


def configure(runtime, local_size: int) -> None:
    """Threads per rank, seeds and determinism; call once per process, before building models."""
    import tensorflow as tf
    cores = os.cpu_count() or 1
    intra = runtime.intra_op_threads or max(1, cores // max(1, local_size))
    inter = runtime.inter_op_threads or 2
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError:
        pass  # already initialised in this process (e.g. a second Trainer in one test): keep the first setting
    seed_everything(runtime.seed)
    if runtime.deterministic:
        tf.config.experimental.enable_op_determinism()


def seed_everything(seed: int) -> None:
    """The same seed on every rank: replicas start identical even before the broadcast confirms it."""
    import tensorflow as tf
    tf.keras.utils.set_random_seed(seed)
