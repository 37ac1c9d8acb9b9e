"""Which of a model's variables a strategy averages or sends, named once: the trainable weights, the float state
(batch-norm statistics) beside them, never step counters or seed state."""
from __future__ import annotations

GRADIENT_ACCUMULATOR = "gradient_accumulator"   # the name Keras gives an optimizer's gradient accumulators


def dtype_name(variable) -> str:
    return str(getattr(variable.dtype, "name", variable.dtype))


def float_variables(variables) -> list:
    """The floating-point ones (not step counters)."""
    return [v for v in variables if "float" in dtype_name(v)]


def model_state(model) -> list:
    """The trainable weights and the float state (batch-norm statistics): what an average of models covers."""
    return list(model.trainable_variables) + float_variables(model.non_trainable_variables)


def nbytes(variables, element_bytes: int | None = None) -> int:
    """The payload of these variables (element_bytes: as sent, e.g. 2 with fp16 compression)."""
    import numpy as np
    return sum(int(np.prod(v.shape)) * (element_bytes or np.dtype(dtype_name(v)).itemsize) for v in variables)
