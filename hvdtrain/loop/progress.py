"""Where a training loop is and how it behaves: `Progress` (the position, why it stopped, what each epoch gave),
read by the session, and `Options` (the loop's settings, trainer.* and runtime.*'s defaults)."""
from __future__ import annotations

from dataclasses import dataclass, field

from hvdtrain.checkpoint import Position
from hvdtrain.config import RuntimeConfig, TrainerConfig


@dataclass
class Progress:
    steps_per_epoch: int
    epochs: int
    position: Position = field(default_factory=Position)
    stop_reason: str = ""        # "", "nonfinite", "stop_requested" or "data_error": agreed by all ranks
    failure: str = ""
    requested_by: str = ""       # who asked for the stop, e.g. "SIGUSR1" or "SIGUSR1 on rank 1"
    history: list = field(default_factory=list)
    last_eval: tuple = (-1, None)   # (global step, metrics) of the latest exact evaluation

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def finished(self) -> bool:
        return self.position.global_step >= self.total_steps

    def advance(self) -> None:
        self.position = Position.at(self.position.global_step + 1, self.steps_per_epoch)


@dataclass(frozen=True)
class Options:
    """How a session behaves. The defaults are trainer.*'s and runtime.*'s, declared with their help in config.py:
    the CLI fills it with `from_config`, the Keras API from its keyword arguments (whose defaults are these)."""
    check_every_steps: int = TrainerConfig.check_every_steps
    checkpoint_every_epochs: int = TrainerConfig.checkpoint_every_epochs
    checkpoint_every_steps: int = TrainerConfig.checkpoint_every_steps
    keep_checkpoints: int = TrainerConfig.keep_checkpoints
    stall_timeout_s: float = RuntimeConfig.stall_timeout_s
    progress: str = TrainerConfig.progress
    csv: bool = True
    tensorboard: bool = TrainerConfig.tensorboard

    @classmethod
    def from_config(cls, cfg) -> Options:
        t = cfg.trainer
        return cls(check_every_steps=t.check_every_steps, checkpoint_every_epochs=t.checkpoint_every_epochs,
                   checkpoint_every_steps=t.checkpoint_every_steps, keep_checkpoints=t.keep_checkpoints,
                   stall_timeout_s=cfg.runtime.stall_timeout_s, progress=t.progress, tensorboard=t.tensorboard)
