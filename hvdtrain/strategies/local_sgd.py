"""Local SGD (trainer.sync=local_sgd; Stich, ICLR 2019; post-local SGD: Lin et al., ICLR 2020): each rank takes
`period` steps on its own, then the weights are averaged; with `warmup_steps`, every-step averaging first. An epoch's
end always averages too, so the epoch's evaluation, checkpoint and the final model see one model. Between averages
the replicas differ: the ranks agree on stops and write checkpoints only where they are one model again (at an
average), so a resume continues exactly. Optimizer state (momentum, Adam's moments) is kept local (Lin et al.;
PyTorch's PostLocalSGDOptimizer), and every rank checkpoints its own; or it is averaged with the weights.

The plan is a pure function of the global step, so a resumed run makes the same averages. During the warm-up the
distributed optimizer averages the gradients; a switch (a boolean variable read inside the compiled step) turns that
off after it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hvdtrain import backend
from hvdtrain.strategies.base import DataParallel, check_compiled
from hvdtrain.variables import float_variables, model_state


@dataclass(frozen=True)
class Periods:
    period: int = 8            # H: local steps between weight averages
    warmup_steps: int = 0      # every-step averaging for this many steps first
    steps_per_epoch: int = 1

    def averages_gradients(self, step: int) -> bool:
        """Does optimizer step `step` (0-based) average its gradients (the warm-up)?"""
        return step < self.warmup_steps

    def averages_weights_after(self, done: int) -> bool:
        """Are the weights averaged once `done` steps have run?"""
        if done <= self.warmup_steps:
            return False
        return (done - self.warmup_steps) % self.period == 0 or done % self.steps_per_epoch == 0

    def one_model_after(self, done: int) -> bool:
        """After `done` steps, are the replicas one model (the step averaged its gradients, or the weights were
        averaged after it)?"""
        return self.averages_gradients(done - 1) or self.averages_weights_after(done)

    def weight_averages(self, done: int) -> int:
        """How many weight averages the first `done` steps made: every period after the warm-up, plus the epoch ends
        that fall between them."""
        if done <= self.warmup_steps:
            return 0
        w, spe = self.warmup_steps, self.steps_per_epoch
        periodic = (done - w) // self.period
        epoch_ends = range((w // spe + 1) * spe, done + 1, spe)
        return periodic + sum(1 for end in epoch_ends if (end - w) % self.period)


class LocalSGD(DataParallel):
    name = "local_sgd"

    def __init__(self, world, periods: Periods, optimizer_state: str = "local"):
        super().__init__(world)
        self.periods, self.optimizer_state = periods, optimizer_state
        import tensorflow as tf
        self.switch = tf.Variable(periods.warmup_steps > 0, trainable=False, name="hvdtrain_average_gradients")
        self._average = None
        self.weight_averages_run = 0   # by this process: the plan, carried out (summary.json shows it)

    @classmethod
    def from_config(cls, cfg, world, *, source=None, run=None) -> "LocalSGD":
        t = cfg.trainer
        return cls(world, Periods(t.sync_period, t.sync_warmup_steps), t.sync_optimizer_state)

    def epoch_steps(self, count) -> int:
        """An epoch's end always averages: the plan needs the epoch's length."""
        steps = count()
        self.periods = dataclasses.replace(self.periods, steps_per_epoch=steps)
        return steps

    @property
    def own_optimizer_state(self) -> bool:
        """Does each rank keep its own optimizer state (so it is checkpointed, and resumed, rank by rank)?"""
        return self.optimizer_state == "local"

    def distribute(self, optimizer, **options):
        return super().distribute(optimizer, switch=self.switch, **options)

    def signature(self, whole: dict) -> dict:
        whole = super().signature(whole)
        return {**whole, "per_rank": self.world.size} if self.own_optimizer_state else whole

    @property
    def checkpoint_part(self):
        if self.own_optimizer_state:
            return f"rank-{self.world.rank}", True   # the same weights, each rank's own optimizer state
        return super().checkpoint_part

    def start(self, model, elastic: bool = False) -> None:
        """Every rank from rank 0's weights; its optimizer state too, unless each rank keeps (and restored) its own."""
        if not self.own_optimizer_state:
            return super().start(model, elastic)
        check_compiled(model, self.world, elastic)
        backend.build_optimizer(model.optimizer, model.trainable_variables)
        backend.broadcast_variables(model.variables, name="hvdtrain.start")

    def begin(self, done: int) -> None:
        self.switch.assign(self.periods.averages_gradients(done))

    def after_step(self, model, done: int) -> bool:
        averaging = self.periods.averages_weights_after(done)
        if averaging:
            if self._average is None:
                self._average = backend.variable_averager(self._averaged(model), "hvdtrain.local_sgd",
                                                          self.world.replica_group)
            self._average()
            self.weight_averages_run += 1
        if self.periods.averages_gradients(done) != self.periods.averages_gradients(done - 1):
            self.switch.assign(self.periods.averages_gradients(done))
        return averaging

    def one_model_after(self, done: int) -> bool:
        return self.periods.one_model_after(done)

    def _averaged(self, model) -> list:
        """What a weight average covers: the trainable weights, the float state (batch-norm statistics) and, when
        averaged too, the optimizer's float state."""
        extra = float_variables(model.optimizer.variables) if self.optimizer_state == "average" else []
        return model_state(model) + extra

    def describe(self) -> dict:
        p = self.periods
        return {"mode": self.name, "period": p.period, "warmup_steps": p.warmup_steps,
                "optimizer_state": self.optimizer_state, "weight_averages_this_run": self.weight_averages_run}
