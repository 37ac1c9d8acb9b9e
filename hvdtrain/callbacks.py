"""Keras callbacks, and the one place that defines their order.

Order matters: broadcast first (replicas start identical), then position tracking and the agreed
stop/NaN check, then metric averaging and exact evaluation (anything that reads metrics comes after),
then checkpoints, and rank-0 writers last. Collectives run on every rank; only writers are rank 0.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from hvdtrain import dist
from hvdtrain.errors import UserError


@dataclass
class Position:
    """Where training is: epoch (0-based) and completed steps in it; shared by callbacks and checkpoints."""
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    stop_reason: str = ""   # "", "nonfinite" or "stop_requested", agreed by all ranks
    failure: str = ""
    history: list = field(default_factory=list)


class TrackPosition(tf.keras.callbacks.Callback):
    def __init__(self, position: Position, steps_per_epoch: int):
        super().__init__()
        self.position, self.steps = position, steps_per_epoch

    def on_epoch_begin(self, epoch, logs=None):
        if self.position.epoch != epoch:
            self.position.epoch, self.position.step_in_epoch = epoch, 0

    def on_train_batch_end(self, batch, logs=None):
        self.position.step_in_epoch += 1
        self.position.global_step += 1

    def on_epoch_end(self, epoch, logs=None):
        if self.position.step_in_epoch >= self.steps:
            self.position.epoch, self.position.step_in_epoch = epoch + 1, 0


class StopRequest:
    """Set by a signal handler (e.g. Slurm's USR1 before preemption or the time limit); read by AgreedStop."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""

    def install(self, signals=(signal.SIGUSR1, signal.SIGTERM)) -> "StopRequest":
        for sig in signals:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested, self.signal_name = True, signal.Signals(signum).name


class NonFiniteLoss(UserError):
    exit_code = 3


class AgreedStop(tf.keras.callbacks.Callback):
    """Every `every` steps all ranks exchange (loss finite?, stop requested?) and stop together at that step."""

    def __init__(self, topo, position: Position, stop: StopRequest, every: int):
        super().__init__()
        self.topo, self.position, self.stop, self.every = topo, position, stop, every

    def on_train_batch_end(self, batch, logs=None):
        if self.position.step_in_epoch % self.every == 0:
            self._check(logs or {})

    def on_epoch_end(self, epoch, logs=None):
        if not self.model.stop_training:
            self._check(logs or {})

    def _weights_finite(self) -> bool:
        if not hasattr(self, "_finite_fn"):
            variables = self.model.trainable_variables
            self._finite_fn = tf.function(lambda: tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in variables]))
        return bool(self._finite_fn())

    def _check(self, logs):
        # Weights too: a NaN gradient can leave the loss finite (e.g. ReLU maps NaN to 0) while the model is dead.
        healthy = math.isfinite(float(logs.get("loss", 0.0))) and self._weights_finite()
        flags = np.zeros(self.topo.size + 1)
        flags[self.topo.rank] = 0.0 if healthy else 1.0
        flags[-1] = 1.0 if self.stop.requested else 0.0
        total = dist.allreduce_sum(flags, name="hvdtrain.agreed_stop")
        bad = [r for r in range(self.topo.size) if total[r] > 0]
        if bad:
            self.position.failure = (
                f"non-finite loss or weights at epoch {self.position.epoch + 1}, step {self.position.step_in_epoch} "
                f"(global step {self.position.global_step}) on rank(s) {', '.join(map(str, bad))}; all ranks stopped, "
                "the last good checkpoint is kept; lower optim.lr or check the data")
            self.position.stop_reason = "nonfinite"
            self.model.stop_training = True
        elif total[-1] > 0:
            self.position.stop_reason = "stop_requested"
            self.model.stop_training = True


class Watchdog(tf.keras.callbacks.Callback):
    """Ends this rank if training makes no progress for `timeout` seconds.

    A rank blocked in a collective whose peer died, stalled or lost its network would otherwise wait forever
    (MPI has no timeout). Armed after the first batch (tracing and the initial broadcast may be slow); epoch-end
    work (evaluation, checkpoint) must finish within the timeout too. Exiting lets the launcher stop the others.
    """

    EXIT_CODE = 4

    def __init__(self, timeout: float, rank: int, run_dir, stream=None):
        super().__init__()
        self.timeout, self.rank, self.run_dir = timeout, rank, run_dir
        self.stream = stream or sys.stderr
        self.last_beat, self.armed, self.done = time.monotonic(), False, threading.Event()

    def beat(self, *_args, **_kwargs):
        self.last_beat = time.monotonic()

    on_epoch_begin = on_epoch_end = on_test_batch_end = beat

    def on_train_begin(self, logs=None):
        self.done.clear()
        threading.Thread(target=self._watch, name="hvdtrain-watchdog", daemon=True).start()

    def on_train_batch_end(self, batch, logs=None):
        self.beat()
        self.armed = True

    def on_train_end(self, logs=None):
        self.done.set()

    def _watch(self):
        while not self.done.wait(min(1.0, self.timeout / 10)):
            idle = time.monotonic() - self.last_beat
            if self.armed and idle > self.timeout:
                print(f"hvdtrain: error: rank {self.rank} made no progress for {idle:.0f} s (runtime.stall_timeout_s="
                      f"{self.timeout:g}): a peer rank died, stalled or lost its network; stopping. The checkpoints in "
                      f"{self.run_dir}/checkpoints are intact: rerun the same command to resume.",
                      file=self.stream, flush=True)
                os._exit(self.EXIT_CODE)


class ElasticCommit(tf.keras.callbacks.Callback):
    """Copies the position into Horovod's elastic state and commits it every `every` steps and at epoch ends.
    A commit is also where Horovod interrupts training when hosts were added or removed (on every rank at once)."""

    def __init__(self, state, position: Position, every: int):
        super().__init__()
        self.state, self.position, self.every = state, position, every

    def _commit(self):
        self.state.epoch, self.state.step_in_epoch = self.position.epoch, self.position.step_in_epoch
        self.state.global_step = self.position.global_step
        self.state.commit()

    def on_train_batch_end(self, batch, logs=None):
        if self.position.step_in_epoch % self.every == 0:
            self._commit()

    def on_epoch_end(self, epoch, logs=None):
        self._commit()


def stop_watchdogs(callbacks) -> None:
    """Keras skips on_train_end when fit raises: stop watchdogs explicitly (e.g. before an elastic reset)."""
    for callback in callbacks:
        if isinstance(callback, Watchdog):
            callback.done.set()


class Throughput(tf.keras.callbacks.Callback):
    """Samples/s per epoch, global and per rank, written into the epoch logs."""

    def __init__(self, global_batch: int, size: int):
        super().__init__()
        self.global_batch, self.size = global_batch, size

    def on_epoch_begin(self, epoch, logs=None):
        self.start, self.batches = time.perf_counter(), 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1

    def on_epoch_end(self, epoch, logs=None):
        seconds = max(time.perf_counter() - self.start, 1e-9)
        logs["samples_per_sec"] = self.batches * self.global_batch / seconds
        logs["samples_per_sec_per_rank"] = logs["samples_per_sec"] / self.size
        logs["epoch_seconds"] = seconds


class ExactEvaluation(tf.keras.callbacks.Callback):
    """Held-out metrics from all-reduced sums at the end of each epoch (exact whatever the shard sizes);
    `evaluate_fn` returns None when the data source has no held-out split."""

    def __init__(self, evaluate_fn, prefix: str = "val_"):
        super().__init__()
        self.evaluate_fn, self.prefix = evaluate_fn, prefix

    def on_epoch_end(self, epoch, logs=None):
        metrics = self.evaluate_fn(self.model)
        for key in ("loss", "accuracy") if metrics else ():
            logs[self.prefix + key] = metrics[key]



class EpochCheckpoint(tf.keras.callbacks.Callback):
    """Rank 0 writes a checkpoint every `every` completed epochs (the save itself holds no collective)."""

    def __init__(self, save_fn, position: Position, every: int):
        super().__init__()
        self.save_fn, self.position, self.every = save_fn, position, every

    def on_epoch_end(self, epoch, logs=None):
        if self.position.step_in_epoch == 0 and (epoch + 1) % self.every == 0 and not self.position.stop_reason:
            self.save_fn()


class EpochHistory(tf.keras.callbacks.Callback):
    def __init__(self, position: Position):
        super().__init__()
        self.position = position

    def on_epoch_end(self, epoch, logs=None):
        self.position.history.append({"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}})


class ProgressLogger(tf.keras.callbacks.Callback):
    """Rank 0's display, after averaging. `bar`: a live bar on a terminal. `epoch`: one line per epoch, plus a
    progress line every `interval` seconds inside long epochs (launchers prefix and buffer lines, so no \r there)."""

    SHOWN = ("loss", "accuracy", "val_loss", "val_accuracy")

    def __init__(self, mode: str, epochs: int, steps: int, stream=None, interval: float = 30.0):
        super().__init__()
        self.stream = stream or sys.stdout
        if mode == "auto":
            mode = "bar" if self.stream.isatty() and not dist.under_launcher() else "epoch"
        self.mode, self.epochs, self.steps, self.interval = mode, epochs, steps, interval

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.epoch_start = self.last_line = time.perf_counter()
        self.done = 0
        if self.mode == "bar":
            print(f"Epoch {epoch + 1}/{self.epochs}", file=self.stream)
            self.bar = tf.keras.utils.Progbar(self.steps, stateful_metrics=list(self.SHOWN))

    def on_train_batch_end(self, batch, logs=None):
        self.done += 1
        shown = [(k, v) for k, v in (logs or {}).items() if k in self.SHOWN]
        if self.mode == "bar":
            self.bar.update(min(self.done, self.steps), shown)
        elif self.mode == "epoch" and time.perf_counter() - self.last_line > self.interval:
            self.last_line = time.perf_counter()
            rate = self.done / (self.last_line - self.epoch_start)
            eta = (self.steps - self.done) / max(rate, 1e-9)
            print(f"  epoch {self.epoch + 1} step {self.done}/{self.steps}  "
                  + "  ".join(f"{k} {v:.4f}" for k, v in shown) + f"  eta {eta:.0f}s", file=self.stream, flush=True)

    def on_epoch_end(self, epoch, logs=None):
        if self.mode == "none":
            return
        logs = logs or {}
        parts = [f"{k} {logs[k]:.4f}" for k in self.SHOWN if k in logs]
        parts.append(f"{logs.get('samples_per_sec', 0):,.0f} samples/s")
        parts.append(f"{time.perf_counter() - self.epoch_start:.1f}s")
        print(f"epoch {epoch + 1}/{self.epochs}  " + "  ".join(parts), file=self.stream, flush=True)


def build_callbacks(cfg, topo, run_dir, *, position, stop, steps_per_epoch, evaluate_fn, save_fn, elastic_state=None):
    """The full list in its one correct order. Rank-0 writers are simply absent on other ranks.
    The elastic commit comes last, so an interruption it raises never skips an epoch's writers."""
    callbacks = [
        Watchdog(cfg.runtime.stall_timeout_s, topo.rank, run_dir),
        dist.broadcast_callback(),
        TrackPosition(position, steps_per_epoch),
        AgreedStop(topo, position, stop, cfg.trainer.check_every_steps),
        dist.metric_average_callback(),
        Throughput(cfg.trainer.global_batch_size, topo.size),
    ]
    if evaluate_fn is not None:
        callbacks.append(ExactEvaluation(evaluate_fn))
    callbacks += [EpochCheckpoint(save_fn, position, cfg.trainer.checkpoint_every_epochs), EpochHistory(position)]
    if topo.is_chief:
        callbacks.append(ProgressLogger(cfg.trainer.progress, cfg.trainer.epochs, steps_per_epoch))
        callbacks.append(tf.keras.callbacks.CSVLogger(str(run_dir / "metrics.csv"), append=True))
        if cfg.trainer.tensorboard:
            callbacks.append(tf.keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), write_graph=False,
                                                            profile_batch=0))
    if elastic_state is not None:
        callbacks.append(ElasticCommit(elastic_state, position, cfg.trainer.check_every_steps))
    return callbacks
