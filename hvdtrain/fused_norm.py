"""TensorFlow's fused batch-norm kernel for Keras 3's BatchNormalization layers while they train.

Keras 2 trained BatchNormalization with one fused kernel (FusedBatchNormV3 and its gradient). Keras 3 composes it
from a dozen element-wise ops and reductions, which makes a small ResNet's step about 1.4x slower on CPU than on the
2023 stack (docs/benchmarks.md, "The two stacks"). `fuse_batch_norm(model)` gives each eligible layer of a model back
the fused kernel in training. Only the computation changes: the layer's class, config, variables and their names
stay, so checkpoints, `model.keras` and a model rebuilt from its config are unaffected, and the results are Keras 3's
up to float rounding (the moving variance keeps Keras 3's biased estimate). Inference, masks, renorm and anything
but a channels-last 4-D input keep Keras's own code.
"""
from __future__ import annotations

import types


def fuse_batch_norm(model) -> int:
    """Switch the BatchNormalization layers of `model` (nested models included) to the fused kernel in training, on
    Keras 3 with the TensorFlow backend; returns how many layers were switched (0 on Keras 2, already fused)."""
    import keras

    from hvdtrain import runtime
    if runtime.keras_major() < 3 or keras.backend.backend() != "tensorflow":
        return 0
    layers = [layer for layer in _all_layers(model) if type(layer) is keras.layers.BatchNormalization]
    for layer in layers:
        keras_call = layer.call
        # Bound to the instance, not the class: other models and a plain rebuild keep Keras's own call.
        layer.call = types.MethodType(_fused_call(keras_call), layer)
    return len(layers)


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def _fused_call(keras_call):
    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable) or mask is not None or self.renorm or len(inputs.shape) != 4 \
                or self.axis not in (3, -1):
            return keras_call(inputs, training=training, mask=mask)
        return _fused_training_step(self, inputs)
    return call


def _fused_training_step(layer, inputs):
    import tensorflow as tf
    x = tf.cast(inputs, tf.float32)   # as Keras 3 does: statistics in float32 under mixed precision too
    channels = x.shape[-1]
    gamma = tf.cast(layer.gamma, tf.float32) if layer.scale else tf.ones([channels], tf.float32)
    beta = tf.cast(layer.beta, tf.float32) if layer.center else tf.zeros([channels], tf.float32)
    y, mean, unbiased_variance = tf.compat.v1.nn.fused_batch_norm(
        x, gamma, beta, epsilon=layer.epsilon, data_format="NHWC", is_training=True)[:3]
    # The kernel normalises with the batch's biased variance but returns the unbiased one; Keras 3 averages the
    # biased one into moving_variance.
    count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)
    variance = unbiased_variance * (count - 1.0) / count
    momentum = layer.momentum
    layer.moving_mean.assign(tf.cast(layer.moving_mean, tf.float32) * momentum + mean * (1.0 - momentum))
    layer.moving_variance.assign(tf.cast(layer.moving_variance, tf.float32) * momentum + variance * (1.0 - momentum))
    return tf.cast(y, layer.compute_dtype)
