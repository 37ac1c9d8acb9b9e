"""Model registry: name -> builder(input_shape, num_classes, model_cfg) returning an uncompiled Keras model.

Builders know nothing about ranks. Models output logits; losses use from_logits=True.
"""
from __future__ import annotations

from typing import Callable

from hvdtrain.errors import UserError

_REGISTRY: dict[str, Callable] = {}


def register_model(name: str):
    """Decorator: @register_model("mine") def build(input_shape, num_classes, model_cfg) -> tf.keras.Model."""
    def add(builder: Callable) -> Callable:
        _REGISTRY[name] = builder
        return builder
    return add


def available() -> list[str]:
    return sorted(_REGISTRY)


def build_model(model_cfg, input_shape: tuple, num_classes: int):
    if model_cfg.name not in _REGISTRY:
        import difflib
        close = difflib.get_close_matches(model_cfg.name, _REGISTRY, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"unknown model '{model_cfg.name}'{hint}; registered models: {', '.join(available())}")
    return _REGISTRY[model_cfg.name](tuple(input_shape), num_classes, model_cfg)


@register_model("mlp")
def mlp(input_shape, num_classes, model_cfg):
    import tensorflow as tf
    layers = [tf.keras.layers.Flatten(input_shape=input_shape)]
    layers += [tf.keras.layers.Dense(width, activation="relu") for width in model_cfg.hidden]
    layers += [tf.keras.layers.Dense(num_classes)]
    return tf.keras.Sequential(layers, name="mlp")


@register_model("cnn")
def cnn(input_shape, num_classes, model_cfg):
    import tensorflow as tf
    w = model_cfg.width
    return tf.keras.Sequential([
        tf.keras.layers.Conv2D(w, 3, padding="same", activation="relu", input_shape=input_shape),
        tf.keras.layers.Conv2D(2 * w, 3, padding="same", activation="relu"),
        tf.keras.layers.MaxPooling2D(2, padding="same"),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(4 * w, activation="relu"),
        tf.keras.layers.Dense(num_classes),
    ], name="cnn")


@register_model("resnet")
def resnet(input_shape, num_classes, model_cfg):
    """A small ResNet: a stem, two stages of residual blocks (the second at half resolution), global pooling."""
    import tensorflow as tf
    L = tf.keras.layers

    def block(x, filters, stride):
        shortcut = x
        y = L.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
        y = L.BatchNormalization()(y)
        y = L.ReLU()(y)
        y = L.Conv2D(filters, 3, padding="same", use_bias=False)(y)
        y = L.BatchNormalization()(y)
        if stride != 1 or shortcut.shape[-1] != filters:
            shortcut = L.Conv2D(filters, 1, strides=stride, use_bias=False)(shortcut)
        return L.ReLU()(L.Add()([y, shortcut]))

    inputs = tf.keras.Input(input_shape)
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(model_cfg.width, 3, padding="same", use_bias=False)(inputs)))
    for stage, filters in enumerate((model_cfg.width, 2 * model_cfg.width)):
        for i in range(model_cfg.blocks):
            x = block(x, filters, 2 if (stage > 0 and i == 0) else 1)
    x = L.GlobalAveragePooling2D()(x)
    return tf.keras.Model(inputs, L.Dense(num_classes)(x), name="resnet")
