"""How the replicas stay one model, and what that costs in bytes (trainer.sync).

every_step  data parallelism: every optimizer step averages the gradients over the replicas (one grouped all-reduce).
local_sgd   each rank takes `period` steps on its own, then the weights are averaged (Lin et al., ICLR 2020); with
            `warmup_steps`, every-step averaging first ("post-local SGD"). An epoch's end always averages too, so the
            epoch's evaluation, checkpoint and the final model see one model. Between averages the replicas differ:
            the ranks agree on stops and write checkpoints only where they are one model again (at an average), so a
            resume continues exactly. Optimizer state (momentum, Adam's moments) is kept local (Lin et al.; PyTorch's
            PostLocalSGDOptimizer), and every rank checkpoints its own; or it is averaged with the weights.
fedavg      federated averaging (federated.py runs its rounds): a step is a round, each ends with one all-reduce
            of the clients' weights, weighted by their examples (in float64: 8 bytes a value).

The plan is a pure function of the global step, so a resumed run makes the same averages, and the bytes sent are
counted from it: the payload each rank contributes to all-reduces of gradients and weights (a ring all-reduce puts
2(n-1)/n of it on the wire); control messages of a few bytes (stop agreement, metrics) are not counted.
"""
from __future__ import annotations

from dataclasses import dataclass

from hvdtrain import backend

@dataclass(frozen=True)
class SyncPlan:
    mode: str = "every_step"
    period: int = 1            # H: local steps between weight averages
    warmup_steps: int = 0      # every-step averaging for this many steps first
    optimizer_state: str = "local"
    steps_per_epoch: int = 1
    accumulation: int = 1      # every_step: batches per gradient all-reduce (optim.backward_passes_per_step)

    @classmethod
    def from_config(cls, trainer_cfg, steps_per_epoch: int, accumulation: int = 1) -> "SyncPlan":
        t = trainer_cfg
        if t.sync != "local_sgd":
            return cls(t.sync, steps_per_epoch=steps_per_epoch, accumulation=accumulation)
        return cls(t.sync, t.sync_period, t.sync_warmup_steps, t.sync_optimizer_state, steps_per_epoch)

    @property
    def local(self) -> bool:
        return self.mode == "local_sgd"

    @property
    def local_optimizer_state(self) -> bool:
        """Does each rank keep its own optimizer state (so it is checkpointed, and resumed, rank by rank)?"""
        return self.local and self.optimizer_state == "local"

    def averages_gradients(self, step: int) -> bool:
        """Does optimizer step `step` (0-based) average its gradients?"""
        return self.mode == "every_step" or (self.local and step < self.warmup_steps)

    def averages_weights_after(self, done: int) -> bool:
        """Are the weights averaged once `done` steps have run?"""
        if self.mode == "fedavg":
            return done > 0
        if not self.local or done <= self.warmup_steps:
            return False
        return (done - self.warmup_steps) % self.period == 0 or done % self.steps_per_epoch == 0

    def local_after(self, done: int) -> bool:
        """Was the `done`-th step a local one (its gradients not averaged)?"""
        return not self.averages_gradients(done - 1)

    def gradient_averages(self, done: int) -> int:
        return {"every_step": done // self.accumulation, "fedavg": 0}.get(self.mode, min(done, self.warmup_steps))

    def weight_averages(self, done: int) -> int:
        """How many weight averages the first `done` steps made: every period after the warm-up, plus the epoch ends
        that fall between them (fedavg: one per round)."""
        if self.mode == "fedavg":
            return done
        if not self.local or done <= self.warmup_steps:
            return 0
        w, spe = self.warmup_steps, self.steps_per_epoch
        periodic = (done - w) // self.period
        epoch_ends = range((w // spe + 1) * spe, done + 1, spe)
        return periodic + sum(1 for end in epoch_ends if (end - w) % self.period)

    def communicated_bytes(self, done: int, gradient_bytes: int, weight_bytes: int) -> int:
        return self.gradient_averages(done) * gradient_bytes + self.weight_averages(done) * weight_bytes

    def describe(self) -> dict:
        if not self.local:
            return {"mode": self.mode}   # fedavg: the run's summary adds its settings
        return {"mode": self.mode, "period": self.period, "warmup_steps": self.warmup_steps,
                "optimizer_state": self.optimizer_state}


def nbytes(variables, element_bytes: int | None = None) -> int:
    """The payload of these variables (element_bytes: as sent, e.g. 2 with fp16 compression)."""
    import numpy as np
    return sum(int(np.prod(v.shape)) * (element_bytes or np.dtype(_dtype_name(v)).itemsize) for v in variables)


def _dtype_name(variable) -> str:
    return str(getattr(variable.dtype, "name", variable.dtype))


def model_state(model) -> list:
    """The trainable weights and the float state (batch-norm statistics): what an average of models covers."""
    return list(model.trainable_variables) + float_variables(model.non_trainable_variables)


def float_variables(variables) -> list:
    """The floating-point ones (not step counters)."""
    return [v for v in variables if "float" in _dtype_name(v)]


def _compresses(optimizer) -> bool:
    """Does this distributed optimizer send float16 gradients (hvdtrain's Keras 3 layer marks it)?"""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return bool(getattr(inner, "_hvdtrain_fp16", False))


class Synchronizer:
    """The plan, carried out on every rank (a collective at every average): the gradient switch of the distributed
    optimizer set for each step, the weights averaged when due, and the bytes counted."""

    def __init__(self, plan: SyncPlan, world, switch=None, fp16_compression: bool = False):
        self.plan, self.world, self.switch = plan, world, switch
        self.fp16_compression = fp16_compression
        self._average = None
        self._bytes = None   # (gradient payload, weight payload) per average, once the model is known
        self.weight_averages_run = 0   # by this process: the plan, carried out (summary.json shows it)

    @classmethod
    def for_plan(cls, plan: SyncPlan, world, fp16_compression: bool = False) -> "Synchronizer":
        """With local SGD, a switch (a boolean variable read inside the compiled train step) turns the optimizer's
        gradient average on for the warm-up and off after it."""
        switch = None
        if plan.local:
            import tensorflow as tf
            switch = tf.Variable(plan.warmup_steps > 0, trainable=False, name="hvdtrain_average_gradients")
        return cls(plan, world, switch, fp16_compression)

    def begin(self, done: int) -> None:
        """Before the first step of a fit (a resume starts at a position where the replicas are one model)."""
        if self.switch is not None:
            self.switch.assign(self.plan.averages_gradients(done))

    def after_step(self, model, done: int) -> bool:
        """After `done` steps: average the weights if due (returns whether it did), set the switch for the next
        step."""
        averaging = self.plan.averages_weights_after(done)
        if averaging:
            if self._average is None:
                self._average = backend.variable_averager(self._averaged(model), "hvdtrain.local_sgd",
                                                          self.world.replica_group)
            self._average()
            self.weight_averages_run += 1
        if self.switch is not None and self.plan.averages_gradients(done) != self.plan.averages_gradients(done - 1):
            self.switch.assign(self.plan.averages_gradients(done))
        return averaging

    def describe(self) -> dict:
        """The plan's settings, and for local SGD the weight averages this process made (the plan, carried out)."""
        done = {"weight_averages_this_run": self.weight_averages_run} if self.plan.local else {}
        return {**self.plan.describe(), **done}

    def _averaged(self, model) -> list:
        """What a weight average covers: the trainable weights, the float state (batch-norm statistics) and, when
        averaged too, the optimizer's float state."""
        extra = float_variables(model.optimizer.variables) \
            if self.plan.local and self.plan.optimizer_state == "average" else []
        return model_state(model) + extra

    def communicated_bytes(self, model, done: int) -> int | None:
        """What this rank has contributed to all-reduces of gradients and weights in the first `done` steps (None for
        a pipeline: its ranks hold different stages, and its activations travel point-to-point)."""
        if self.world.stages > 1:
            return None
        if self.world.replicas == 1:
            return 0
        if self._bytes is None:
            fp16 = self.fp16_compression or _compresses(model.optimizer)
            gradients = nbytes(model.trainable_variables, 2 if fp16 else None)
            weights = self._averaged(model)
            # fedavg sends float64 weighted sums and two counts (examples, loss)
            payload = nbytes(weights, 8) + 16 if self.plan.mode == "fedavg" else nbytes(weights)
            self._bytes = (gradients, payload)
        return self.plan.communicated_bytes(done, *self._bytes)
