"""Optimizer and learning-rate schedule from config; a strategy (strategies/) then makes it distributed.

The LR schedule is a function of the optimizer's step counter, so a resumed run continues its schedule exactly,
and warmup needs no callback (Horovod's LearningRateWarmupCallback crashes with Keras 2.11+ optimizers when
momentum correction is on, and its callbacks do not run on Keras 3 at all).
"""
from __future__ import annotations

import math

import keras
import tensorflow as tf



def scaled_lr(base_lr: float, rule: str, size: int) -> float:
    return base_lr * {"none": 1.0, "linear": float(size), "sqrt": math.sqrt(size)}[rule]


@keras.saving.register_keras_serializable("hvdtrain")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from `start_lr` to `peak_lr` over `warmup_steps`, then constant or cosine to 0 at `total_steps`."""

    def __init__(self, start_lr: float, peak_lr: float, warmup_steps: int, total_steps: int, decay: str = "constant"):
        self.start_lr, self.peak_lr = float(start_lr), float(peak_lr)
        self.warmup_steps, self.total_steps, self.decay = int(warmup_steps), int(total_steps), decay

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = self.start_lr + (self.peak_lr - self.start_lr) * step / max(1, self.warmup_steps)
        if self.decay == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = tf.clip_by_value((step - self.warmup_steps) / span, 0.0, 1.0)
            after = 0.5 * self.peak_lr * (1.0 + tf.cos(math.pi * progress))
        else:
            after = tf.constant(self.peak_lr)
        return tf.where(step < self.warmup_steps, warm, after)

    def get_config(self):
        return {"start_lr": self.start_lr, "peak_lr": self.peak_lr, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "decay": self.decay}


# Where a warm-up starts when lr_scaling has not raised the learning rate: a fixed share of it, the same on any
# number of replicas (so a run with lr_scaling=none is the same run on 1, 2 or 4 ranks, warm-up included).
WARMUP_START_FRACTION = 0.1


def warmup_start(optim_cfg, peak: float) -> float:
    """The first step's learning rate of a warm-up to `peak`: the one-replica lr when lr_scaling raised it (Goyal et
    al.: large scaled LRs diverge in the first steps otherwise), else a fixed share of it. The number of replicas
    enters only through lr_scaling."""
    return optim_cfg.lr if peak > optim_cfg.lr else WARMUP_START_FRACTION * peak


def lr_schedule(optim_cfg, size: int, steps_per_epoch: int, epochs: int) -> WarmupSchedule:
    """`size`: the replicas the learning rate scales with (a pipeline's D, not its ranks)."""
    peak = scaled_lr(optim_cfg.lr, optim_cfg.lr_scaling, size)
    warmup = int(round(optim_cfg.warmup_epochs * steps_per_epoch))
    start = warmup_start(optim_cfg, peak) if warmup else peak
    return WarmupSchedule(start, peak, warmup, steps_per_epoch * epochs, optim_cfg.schedule)


def build_optimizer(optim_cfg, size: int, steps_per_epoch: int, epochs: int):
    """The plain Keras optimizer (not yet distributed)."""
    return optimizer_with(optim_cfg, lr_schedule(optim_cfg, size, steps_per_epoch, epochs))


def optimizer_with(optim_cfg, lr):
    """The configured optimizer with this learning rate: a schedule, or a number (a variable the caller may set)."""
    if optim_cfg.name == "sgd":
        return keras.optimizers.SGD(lr, momentum=optim_cfg.momentum)
    if optim_cfg.name == "adam":
        return keras.optimizers.Adam(lr)
    return keras.optimizers.RMSprop(lr, momentum=optim_cfg.momentum)
