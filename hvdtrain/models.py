"""Models by name: builder(input_shape, num_classes, model_cfg) -> an uncompiled Keras model. Builders know nothing
about ranks. Models output raw scores (logits, or values for regression); the task turns them into losses.

A name is looked up as: a registered builder (mlp, cnn, resnet, or your own via register_model), then a
keras.applications architecture (ResNet50, MobileNetV2, EfficientNetB0, ...; random weights, or a local no-top
weights file in model.weights, never a download), then an import path `package.module:function`.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Callable

from hvdtrain.errors import UserError
from hvdtrain.fused_norm import fuse_batch_norm
from hvdtrain.log import shown

_REGISTRY: dict[str, Callable] = {}


def register_model(name: str):
    """Decorator: @register_model("mine") def build(input_shape, num_classes, model_cfg) -> keras.Model."""
    def add(builder: Callable) -> Callable:
        _REGISTRY[name] = builder
        return builder
    return add


def available() -> list[str]:
    return sorted(_REGISTRY)


def applications() -> list[str]:
    import keras
    return sorted(n for n in dir(keras.applications) if n[:1].isupper() and callable(getattr(keras.applications, n)))


def build_model(model_cfg, input_shape: tuple, num_classes: int):
    name, shape = model_cfg.name, tuple(input_shape)
    if name in _REGISTRY:
        model = _REGISTRY[name](shape, num_classes, model_cfg)
    elif ":" in name:
        model = _imported(name)(shape, num_classes, model_cfg)
    elif _application_name(name):
        model = _application(_application_name(name), shape, num_classes, model_cfg)
    else:
        close = difflib.get_close_matches(name, available() + applications(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"unknown model '{name}'{hint}; use {', '.join(available())}, a keras.applications name such as "
                        "ResNet50, or a builder by import path (package.module:function)", agreed=True)
    model = _float32_outputs(_checked(model, name, num_classes))
    _freeze_before(model, model_cfg.trainable_from)
    fuse_batch_norm(model)   # Keras 3: TensorFlow's fused kernel for BatchNormalization, as Keras 2 had
    return model


def _freeze_before(model, first_trained: str) -> None:
    """model.trainable_from: every layer before `first_trained` (in the order the model runs them) frozen. Keras then
    leaves their weights out of the gradients and the optimizer, so nothing of them is all-reduced either."""
    if not first_trained:
        return
    names = [layer.name for layer in model.layers]
    if first_trained not in names:
        close = difflib.get_close_matches(first_trained, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"model.trainable_from: model {model.name!r} has no layer {first_trained!r}{hint}; its layers "
                        f"are {shown(names, 8)}", agreed=True)
    for layer in model.layers[:names.index(first_trained)]:
        layer.trainable = False
    if not model.trainable_weights:
        raise UserError(f"model.trainable_from={first_trained}: no layer from there on has weights to train; name an "
                        "earlier layer", agreed=True)


def _imported(path: str) -> Callable:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"model.name={path}: cannot import module {module_name!r} ({exc}); put it on PYTHONPATH "
                        "(every rank must be able to import it)", agreed=True) from None
    builder = getattr(module, attr, None)
    if not callable(builder):
        raise UserError(f"model.name={path}: {module_name} has no function {attr!r}", agreed=True)
    return builder


def _application_name(name: str) -> str | None:
    """The keras.applications architecture a name means: exact (ResNet50), or unambiguous in any case (resnet50)."""
    names = applications()
    if name in names:
        return name
    matches = [n for n in names if n.lower() == name.lower()]
    return matches[0] if len(matches) == 1 else None


def _application(name: str, shape: tuple, num_classes: int, model_cfg):
    """A keras.applications body (no top) with global average pooling and a new dense head of num_classes.
    model.weights: a local weights file of the same body without its top (never a download); model.options: more
    keyword arguments of the architecture (e.g. alpha for MobileNetV2)."""
    import keras
    try:
        body = getattr(keras.applications, name)(include_top=False, weights=model_cfg.weights or None,
                                                 input_shape=shape, pooling="avg", **dict(model_cfg.options))
    except (ValueError, TypeError) as exc:   # inputs too small for the architecture, a weights file that does not
        # fit it (Keras says why in its first line), an unknown option
        raise UserError(f"model.name={name} with inputs {list(shape)}"
                        f"{', weights ' + model_cfg.weights if model_cfg.weights else ''}: "
                        f"{str(exc).splitlines()[0]}", agreed=True) from None
    return keras.Model(_inputs(body), keras.layers.Dense(num_classes, name="head")(body.outputs[0]), name=name)


def _checked(model, name: str, num_classes: int):
    import keras
    if not isinstance(model, keras.Model):
        raise UserError(f"model builder {name!r} returned {type(model).__name__}, not a keras.Model", agreed=True)
    if not model.built or not model.outputs:
        raise UserError(f"model builder {name!r} must give its model a known input shape (start with keras.Input)",
                        agreed=True)
    if tuple(model.outputs[0].shape)[-1] != num_classes:
        raise UserError(f"model {name!r} outputs {tuple(model.outputs[0].shape)[-1]} values per example but the data "
                        f"has {num_classes} classes/outputs (data.num_classes)", agreed=True)
    return model


def _float32_outputs(model):
    """Under mixed precision the last layer computes in float16/bfloat16; losses need float32 outputs."""
    import keras
    dtype = model.outputs[0].dtype
    if getattr(dtype, "name", dtype) == "float32":
        return model
    return keras.Model(_inputs(model), keras.layers.Activation("linear", dtype="float32", name="float32_output")(
        model.outputs[0]), name=model.name)


def _inputs(model):
    """A single input as itself, not a one-element list (a list makes Keras expect list inputs)."""
    return model.inputs[0] if len(model.inputs) == 1 else model.inputs


@register_model("mlp")
def mlp(input_shape, num_classes, model_cfg):
    import keras
    layers = [keras.Input(input_shape), keras.layers.Flatten()]
    layers += [keras.layers.Dense(width, activation="relu") for width in model_cfg.hidden]
    layers += [keras.layers.Dense(num_classes)]
    return keras.Sequential(layers, name="mlp")


@register_model("cnn")
def cnn(input_shape, num_classes, model_cfg):
    import keras
    w = model_cfg.width
    return keras.Sequential([
        keras.Input(input_shape),
        keras.layers.Conv2D(w, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(2 * w, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2, padding="same"),
        keras.layers.Flatten(),
        keras.layers.Dense(4 * w, activation="relu"),
        keras.layers.Dense(num_classes),
    ], name="cnn")


@register_model("resnet")
def resnet(input_shape, num_classes, model_cfg):
    """A small ResNet: a stem, two stages of residual blocks (the second at half resolution), global pooling."""
    import keras
    L = keras.layers

    def block(x, filters, stride):
        shortcut = x
        y = L.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
        y = L.ReLU()(L.BatchNormalization()(y))
        y = L.BatchNormalization()(L.Conv2D(filters, 3, padding="same", use_bias=False)(y))
        if stride != 1 or shortcut.shape[-1] != filters:
            shortcut = L.Conv2D(filters, 1, strides=stride, use_bias=False)(shortcut)
        return L.ReLU()(L.Add()([y, shortcut]))

    inputs = keras.Input(input_shape)
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(model_cfg.width, 3, padding="same", use_bias=False)(inputs)))
    for stage, filters in enumerate((model_cfg.width, 2 * model_cfg.width)):
        for i in range(model_cfg.blocks):
            x = block(x, filters, 2 if (stage > 0 and i == 0) else 1)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(num_classes)(x), name="resnet")


@register_model("transformer")
def transformer(input_shape, num_classes, model_cfg):
    """A small vision transformer: the image cut into square patches of model.patch_size, each a token projected to
    model.width with a learned position embedding (the projection's bias, one per patch: built-in layers only, so
    model.keras loads in plain Keras), model.blocks encoder blocks (self-attention with model.heads heads, then an MLP
    of 2 x width with GELU; each followed by its residual add and a layer norm, as in the original transformer),
    then the tokens flattened into the classes. Tensor parallelism splits each block's attention by heads and its
    MLP by columns, then rows. (On the digits, post-norm blocks and the flattened head reached 0.975-0.986 test
    accuracy over three seeds where pre-norm blocks and a mean-pooled head stayed near 0.93.)"""
    import keras
    L = keras.layers
    p, d = model_cfg.patch_size, model_cfg.width
    if len(input_shape) not in (2, 3) or input_shape[0] % p or input_shape[1] % p:
        raise UserError(f"model.name=transformer cuts images into {p}x{p} patches (model.patch_size): inputs "
                        f"{list(input_shape)} must be [height, width(, channels)] divisible by {p}", agreed=True)
    height, width, channels = (*input_shape, 1)[:3]
    tokens = (height // p) * (width // p)
    inputs = keras.Input(input_shape)
    x = L.Reshape((height // p, p, width // p, p, channels))(inputs)
    x = L.Permute((1, 3, 2, 4, 5))(x)
    x = L.Reshape((tokens, p * p * channels))(x)
    x = L.EinsumDense("btc,cd->btd", output_shape=(tokens, d), bias_axes="td", name="patch_embedding")(x)
    for b in range(1, model_cfg.blocks + 1):
        y = L.MultiHeadAttention(model_cfg.heads, d // model_cfg.heads, name=f"block{b}_attention")(x, x)
        x = L.LayerNormalization(epsilon=1e-6, name=f"block{b}_norm1")(L.Add(name=f"block{b}_add1")([x, y]))
        y = L.Dense(2 * d, activation="gelu", name=f"block{b}_mlp1")(x)
        y = L.Dense(d, name=f"block{b}_mlp2")(y)
        x = L.LayerNormalization(epsilon=1e-6, name=f"block{b}_norm2")(L.Add(name=f"block{b}_add2")([x, y]))
    x = L.Flatten(name="tokens")(x)
    return keras.Model(inputs, L.Dense(num_classes, name="head")(x), name="transformer")
