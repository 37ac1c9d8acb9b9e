"""The one place Horovod is imported. Imported lazily, so config, data and model code run without MPI."""
from __future__ import annotations

from hvdtrain.errors import UserError


def hvd():
    """horovod.tensorflow: init, topology and the collectives (framework-neutral; works on Keras 2 and 3)."""
    try:
        import horovod.tensorflow as module
        module.mpi_built()   # loads the compiled extension: fails here if it was built for another TensorFlow
    except Exception as exc:  # ImportError, or TensorFlow's NotFoundError when horovod/tensorflow/mpi_lib is missing
        raise _not_usable(exc) from None
    return module


def hvd_keras():
    """horovod.tensorflow.keras: Horovod's own Keras 2 layer (the tf2.15 stack only; it breaks on Keras 3)."""
    hvd()
    import horovod.tensorflow.keras as module
    return module


def hvd_elastic():
    """horovod.tensorflow.elastic (run/reset) and horovod.common.elastic.ObjectState."""
    hvd()
    import horovod.tensorflow.elastic as elastic
    from horovod.common.elastic import ObjectState
    return elastic, ObjectState


def version() -> str:
    import horovod
    return horovod.__version__


def _not_usable(exc: BaseException) -> UserError:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return UserError(f"Horovod with TensorFlow support is not importable ({first}); rebuild it against this "
                     "TensorFlow: scripts/install.sh --rebuild-horovod")
