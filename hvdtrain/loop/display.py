"""Rank 0's writers: the progress display, metrics.csv and TensorBoard, all Keras callbacks that the loop controller
calls after it has averaged and evaluated. Other ranks get none (call sites never test the rank)."""
from __future__ import annotations

import sys
import time

import keras

from hvdtrain import backend


def writers(world, options, run_dir, progress, unit: str = "epoch") -> list:
    """Rank 0's writers in their order (empty on other ranks). `unit`: what an epoch is called (a federated run's
    rounds)."""
    if not world.is_chief:
        return []
    out = [ProgressLogger(options.progress, progress, unit=unit)]
    if options.csv:
        out.append(keras.callbacks.CSVLogger(str(run_dir / "metrics.csv"), append=True))
    if options.tensorboard:
        out.append(keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), write_graph=False, profile_batch=0))
    return out


class ProgressLogger(keras.callbacks.Callback):
    """Rank 0's display, after averaging. `bar`: a live bar on a terminal. `epoch`: one line per epoch, plus a
    progress line every `interval` seconds inside long epochs (launchers prefix and buffer lines, so no \\r there)."""

    SHOWN = ("loss", "accuracy", "mae", "val_loss", "val_accuracy", "val_mae")

    def __init__(self, mode: str, progress, stream=None, interval: float = 30.0, unit: str = "epoch"):
        super().__init__()
        self.stream = stream or sys.stdout
        if mode == "auto":
            mode = "bar" if self.stream.isatty() and not backend.under_launcher() else "epoch"
        self.mode, self.progress, self.interval, self.unit = mode, progress, interval, unit

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.epoch_start = self.last_line = time.perf_counter()
        self.done = 0
        if self.mode == "bar":
            self._line(f"{self.unit.capitalize()} {epoch + 1}/{self.progress.epochs}")
            self.bar = keras.utils.Progbar(self.progress.steps_per_epoch, stateful_metrics=list(self.SHOWN))

    def on_train_batch_end(self, batch, logs=None):
        self.done += 1
        shown = [(k, float(v)) for k, v in (logs or {}).items() if k in self.SHOWN]
        steps = self.progress.steps_per_epoch
        if self.mode == "bar":
            self.bar.update(min(self.done, steps), shown)
        elif self.mode == "epoch" and time.perf_counter() - self.last_line > self.interval:
            self.last_line = time.perf_counter()
            rate = self.done / (self.last_line - self.epoch_start)
            eta = (steps - self.done) / max(rate, 1e-9)
            self._line(f"  {self.unit} {self.epoch + 1} step {self.done}/{steps}  "
                       + "  ".join(f"{k} {v:.4f}" for k, v in shown) + f"  eta {eta:.0f}s")

    def on_epoch_end(self, epoch, logs=None):
        if self.mode == "none":
            return
        logs = logs or {}
        parts = [f"{k} {logs[k]:.4f}" for k in self.SHOWN if k in logs]
        parts.append(f"{logs.get('samples_per_sec', 0):,.0f} samples/s")
        parts.append(f"{time.perf_counter() - self.epoch_start:.1f}s")
        if logs.get("partial"):
            end = self.progress.position
            parts.append(f"(partial {self.unit}: {self.done} of {self.progress.steps_per_epoch} steps, up to global "
                         f"step {end.global_step})")
        self._line(f"{self.unit} {epoch + 1}/{self.progress.epochs}  " + "  ".join(parts))

    def _line(self, text: str) -> None:
        """One write per line: launchers tag output per write, so a line written in pieces gets split."""
        self.stream.write(text + "\n")
        self.stream.flush()
