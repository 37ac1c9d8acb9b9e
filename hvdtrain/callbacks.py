"""Keras callbacks shared by `hvdtrain train` and the Keras API (through session.Session), and their one order.

Order matters (see `ordered`): the watchdog first; then the start check (distributed optimizer, no XLA) and the
broadcast of rank 0's state; position tracking; the agreed stop (non-finite loss or weights, stop requests, a
peer's data error, the last step), which runs before anything writes a checkpoint; checkpoints; metric averaging
and exact evaluation (anything that reads metrics comes after); rank-0 writers last. Collectives run on every
rank, in the same order; only the writers are rank 0's. Everything keys on the true position (global step), so it
stays right when a resumed run's Keras epochs start mid-epoch.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import keras
import numpy as np

from hvdtrain import backend
from hvdtrain.checkpoint import Position
from hvdtrain.config import RuntimeConfig, TrainerConfig
from hvdtrain.errors import CollectiveFailure, DataError, UserError


@dataclass
class Progress:
    """State shared by the callbacks of one fit: where training is, why it stopped, what each epoch gave."""
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

    def advance(self) -> None:
        self.position = Position.at(self.position.global_step + 1, self.steps_per_epoch)


class StopRequest:
    """Set by SIGUSR1/SIGTERM (Slurm's notice before preemption or the time limit), or by a file `stop_file`
    appearing (hvdtrain sweep prunes trials this way); read by AgreedStop at its agreement steps. The file is a
    request, served once its checkpoint is written: `consume()` removes it, so a rerun resumes instead of stopping."""

    def __init__(self, stop_file=None):
        self.signal_name = ""
        self.stop_file = stop_file
        self._requested = False
        self._seen = None   # (device, inode) of the stop file this request saw

    def install(self, signals=(signal.SIGUSR1, signal.SIGTERM)) -> "StopRequest":
        for sig in signals:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self._requested, self.signal_name = True, signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        if not self._requested and self.stop_file:
            self._seen = _identity(self.stop_file)
            if self._seen:
                self._requested, self.signal_name = True, f"stop file {self.stop_file}"
        return self._requested

    def request(self, reason: str = "request") -> None:
        self._requested, self.signal_name = True, reason

    def consume(self) -> bool:
        """Remove the stop file this request saw (after the stop's checkpoint, on rank 0): taken away atomically by a
        rename, and put back if it is a newer file than the one seen (a new request must not be lost)."""
        if not self._seen:
            return False
        taken = f"{self.stop_file}.served"
        try:
            os.rename(self.stop_file, taken)
        except FileNotFoundError:
            return False
        if _identity(taken) != self._seen:
            os.rename(taken, self.stop_file)
            return False
        os.unlink(taken)
        self._seen = None
        return True


def _identity(path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


class Watchdog(keras.callbacks.Callback):
    """Ends this rank if training makes no progress for `timeout` seconds.

    A rank blocked in a collective whose peer died, stalled or lost its network would otherwise wait forever
    (MPI has no timeout). Armed after the first batch (tracing and the initial broadcast may be slow); epoch-end
    work (evaluation, checkpoint) must finish within the timeout too. Exiting lets the launcher stop the others.
    """

    EXIT_CODE = CollectiveFailure.exit_code

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
        self.beat()
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
                self.stream.write(   # one write, newline included: launchers tag output per write
                    f"hvdtrain: error: rank {self.rank} made no progress for {idle:.0f} s (runtime.stall_timeout_s="
                    f"{self.timeout:g}): a peer rank died, stalled or lost its network; stopping. The checkpoints in "
                    f"{self.run_dir}/checkpoints are intact: rerun the same command to resume.\n")
                self.stream.flush()
                os._exit(self.EXIT_CODE)


def stop_watchdogs(callbacks) -> None:
    """Keras skips on_train_end when fit raises: stop watchdogs explicitly (e.g. before an elastic reset)."""
    for callback in callbacks:
        if isinstance(callback, Watchdog):
            callback.done.set()


class StartCheck(keras.callbacks.Callback):
    """Before the first step: refuse what would silently train unsynchronised replicas or crash later (an optimizer
    that is not distributed, an XLA-compiled train step), then make every rank start from rank 0's state."""

    def __init__(self, world, elastic: bool = False):
        super().__init__()
        self.world, self.elastic = world, elastic

    def on_train_begin(self, logs=None):
        model = self.model
        if (self.world.size > 1 or self.elastic) and not backend.is_distributed(model.optimizer):
            raise UserError(f"model.optimizer ({type(model.optimizer).__name__}) does not average gradients over the "
                            f"{self.world.size} ranks, so the replicas would drift apart: compile with "
                            "hvdtrain.keras.distribute(optimizer)", agreed=True)
        if backend.uses_xla(model):
            raise UserError("the model was compiled with jit_compile=True (Keras 3 does so by default on GPUs): "
                            "Horovod's all-reduce has no XLA kernel; compile with jit_compile=False", agreed=True)
        optimizer = model.optimizer
        backend.build_optimizer(optimizer, model.trainable_variables)
        backend.broadcast_variables(list(model.variables) + list(optimizer.variables), name="hvdtrain.start")


class TrackPosition(keras.callbacks.Callback):
    def __init__(self, progress: Progress):
        super().__init__()
        self.progress = progress

    def on_train_batch_end(self, batch, logs=None):
        self.progress.advance()


class AgreedStop(keras.callbacks.Callback):
    """At every `every`-th step of an epoch, at each epoch end and at the last step, all ranks exchange one vector:
    per rank 'loss or weights not finite', 'a stop was requested', and 'I am here'. A rank that hit a data error has
    left with Horovod's join (its share of the vector reads zero), so the others see it, stop at the same step and
    report that rank's error, agreed. Every rank reaches the same verdict at the same step."""

    def __init__(self, world, progress: Progress, stop: StopRequest, every: int):
        super().__init__()
        self.world, self.progress, self.stop, self.every = world, progress, stop, every

    def on_train_batch_end(self, batch, logs=None):
        p = self.progress.position
        if p.step_in_epoch % self.every == 0 or p.global_step >= self.progress.total_steps:
            self._check(logs or {})
        if p.global_step >= self.progress.total_steps:
            self.model.stop_training = True   # a resumed run's last Keras epoch may run past the end otherwise

    def _weights_finite(self) -> bool:
        if not hasattr(self, "_finite_fn"):
            import tensorflow as tf
            variables = self.model.trainable_variables
            self._finite_fn = tf.function(lambda: tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in variables]),
                                          autograph=False)   # plain ops: nothing for AutoGraph to convert
        return bool(self._finite_fn())

    def _check(self, logs):
        size = self.world.size
        # Weights too: a NaN gradient can leave the loss finite (e.g. ReLU maps NaN to 0) while the model is dead.
        healthy = math.isfinite(float(logs.get("loss", 0.0))) and self._weights_finite()
        flags = np.zeros(size + 2)
        flags[self.world.rank] = 0.0 if healthy else 1.0
        flags[size] = 1.0 if self.stop.requested else 0.0
        flags[size + 1] = 1.0
        total = backend.allreduce_sum(flags, name="hvdtrain.agreed_stop")
        p = self.progress.position
        if total[size + 1] < size:   # a peer left after a data error: join it, then report its error
            self.progress.stop_reason = "data_error"
            backend.follow_leaver("hvdtrain.data_error")
        bad = [r for r in range(size) if total[r] > 0]
        if bad:
            self.progress.failure = (
                f"non-finite loss or weights at epoch {p.epoch + 1}, step {p.step_in_epoch} (global step "
                f"{p.global_step}) on rank(s) {', '.join(map(str, bad))}; all ranks stopped, the last good checkpoint "
                "is kept; lower optim.lr or check the data")
            self.progress.stop_reason = "nonfinite"
            self.model.stop_training = True
        elif total[size] > 0:
            self.progress.stop_reason = "stop_requested"
            self.progress.requested_by = self._who_asked()
            self.model.stop_training = True

    def _who_asked(self) -> str:
        names = backend.allgather_object(self.stop.signal_name if self.stop.requested else "", "hvdtrain.stop_reason")
        asked = {rank: name for rank, name in enumerate(names) if name}
        if len(asked) == len(names) and len(set(asked.values())) == 1:
            return names[0]
        return ", ".join(f"{name} on rank {rank}" for rank, name in asked.items())


def data_error_during_fit(exc: BaseException, progress: Progress, world, diagnose=None) -> None:
    """On the rank whose input pipeline failed mid-step: leave with Horovod's join (the peers notice at their next
    agreement step and join too), then raise this rank's error, agreed by all. Returns for anything else.
    `diagnose()` re-checks this rank's inputs and names the bad file and record, if it can."""
    if not is_input_error(exc):
        return
    import tensorflow as tf
    p = progress.position
    kind = "corrupt" if isinstance(exc, tf.errors.DataLossError) else "unreadable or malformed"
    found = diagnose() if diagnose else None
    message = (f"{found or f'{kind} input data ({_short(exc)})'}; found at epoch {p.epoch + 1}, step {p.step_in_epoch} "
               f"on rank {world.rank}: the inputs were valid at the start, so a file changed or vanished since; fix it "
               "and rerun the same command to resume")
    backend.leave_with(DataError(message), "hvdtrain.data_error")


def is_input_error(exc: BaseException) -> bool:
    """An error raised by the input pipeline (tf.data's IteratorGetNext), not by the model or a collective."""
    import tensorflow as tf
    return isinstance(exc, tf.errors.OpError) and "IteratorGetNext" in str(exc) and not backend.from_horovod(exc)


def _short(exc) -> str:
    from hvdtrain.errors import first_line
    return first_line(exc)


class LocalState:
    """What each rank updates from its own batches alone: batch-norm moving statistics (the model's non-trainable
    float variables; training never reads them). Averaged over ranks whenever the model is read, before checkpoints,
    evaluation and the final replica check, as MirroredStrategy averages them on read; so every rank saves and
    evaluates the same model. Models without such variables (the MLP) never communicate here."""

    def __init__(self, world):
        self.world, self._average, self._step = world, None, None

    def sync(self, model, step: int) -> None:
        """A collective for models with local state: every rank calls it at the same step."""
        if self.world.size == 1 or step == self._step:
            return
        if self._average is None:
            local = [v for v in model.non_trainable_variables if "float" in str(getattr(v.dtype, "name", v.dtype))]
            self._average = backend.variable_averager(local, "hvdtrain.local_state") if local else (lambda: None)
        self._average()
        self._step = step


class StepCheckpoint(keras.callbacks.Callback):
    """Rank 0 writes a checkpoint every `every` global steps (0: never) and at every `every_epochs`-th true epoch end,
    always after the agreed check of that step (AgreedStop comes first), so non-finite weights are never saved."""

    def __init__(self, progress: Progress, checkpointer, world, every_steps: int, every_epochs: int,
                 local_state: LocalState):
        super().__init__()
        self.progress, self.checkpointer, self.world = progress, checkpointer, world
        self.every_steps, self.every_epochs, self.local_state = every_steps, every_epochs, local_state

    def on_train_batch_end(self, batch, logs=None):
        p = self.progress.position
        if self.progress.stop_reason in ("nonfinite", "data_error"):
            return
        epoch_end = p.step_in_epoch == 0 and p.epoch % self.every_epochs == 0
        if epoch_end or (self.every_steps and p.global_step % self.every_steps == 0) \
                or p.global_step >= self.progress.total_steps:
            self._save(p)

    def on_train_end(self, logs=None):
        """A stop request (preemption): the checkpoint at the agreed stop step, where every rank stopped."""
        if self.progress.stop_reason == "stop_requested":
            self._save(self.progress.position)

    def _save(self, position: Position) -> None:
        self.local_state.sync(self.model, position.global_step)
        self.checkpointer.save(self.model, position, self.world.size)


class MetricAverage(keras.callbacks.Callback):
    """Epoch metrics averaged over ranks, keys in sorted order on every rank (one all-reduce)."""

    def __init__(self, world):
        super().__init__()
        self.world = world
        self._keys = None

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or self.world.size == 1:
            return
        keys = sorted(k for k, v in logs.items() if _is_number(v))
        if self._keys is None:   # once: every rank must average the same metrics, or the all-reduce would hang
            every = backend.allgather_object(keys, "hvdtrain.metric_keys")
            if any(k != every[0] for k in every):
                raise UserError(f"ranks log different metrics {every}; compile the same metrics on every rank", agreed=True)
            self._keys = keys
        values = backend.allreduce_sum([float(logs[k]) for k in self._keys], "hvdtrain.metric_average") / self.world.size
        logs.update(zip(self._keys, (float(v) for v in values)))


def _is_number(value) -> bool:
    try:
        float(value)
        return np.ndim(value) == 0
    except (TypeError, ValueError):
        return False


class Throughput(keras.callbacks.Callback):
    """Samples/s per Keras epoch, global and per rank, and which steps the epoch covered (partial epochs marked)."""

    def __init__(self, progress: Progress, global_batch: int, size: int):
        super().__init__()
        self.progress, self.global_batch, self.size = progress, global_batch, size

    def on_epoch_begin(self, epoch, logs=None):
        self.start, self.batches = time.perf_counter(), 0
        self.first = self.progress.position

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1

    def on_epoch_end(self, epoch, logs=None):
        seconds = max(time.perf_counter() - self.start, 1e-9)
        logs["samples_per_sec"] = self.batches * self.global_batch / seconds
        logs["samples_per_sec_per_rank"] = logs["samples_per_sec"] / self.size
        logs["epoch_seconds"] = seconds
        logs["global_step"] = self.progress.position.global_step
        # Partial: fewer steps than an epoch (stopped mid-epoch), or not starting at an epoch's first step (resumed).
        logs["partial"] = int(self.batches < self.progress.steps_per_epoch or self.first.step_in_epoch != 0)


class ExactEvaluation(keras.callbacks.Callback):
    """Held-out metrics from per-batch sums added in batch order at each epoch end (one process's); `evaluate` returns
    None when there is no held-out split. The result is kept, keyed by global step, for the summary."""

    def __init__(self, evaluate, progress: Progress, local_state: LocalState, prefix: str = "val_"):
        super().__init__()
        self.evaluate, self.progress, self.local_state, self.prefix = evaluate, progress, local_state, prefix

    def on_epoch_end(self, epoch, logs=None):
        self.local_state.sync(self.model, self.progress.position.global_step)
        metrics = self.evaluate(self.model)
        self.progress.last_eval = (self.progress.position.global_step, metrics)
        for key, value in (metrics or {}).items():
            if key != "examples" and isinstance(value, float):
                logs[self.prefix + key] = value


class EpochHistory(keras.callbacks.Callback):
    def __init__(self, progress: Progress):
        super().__init__()
        self.progress = progress

    def on_epoch_end(self, epoch, logs=None):
        self.progress.history.append({"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items() if _is_number(v)}})


class ProgressLogger(keras.callbacks.Callback):
    """Rank 0's display, after averaging. `bar`: a live bar on a terminal. `epoch`: one line per epoch, plus a
    progress line every `interval` seconds inside long epochs (launchers prefix and buffer lines, so no \\r there)."""

    SHOWN = ("loss", "accuracy", "mae", "val_loss", "val_accuracy", "val_mae")

    def __init__(self, mode: str, progress: Progress, stream=None, interval: float = 30.0):
        super().__init__()
        self.stream = stream or sys.stdout
        if mode == "auto":
            mode = "bar" if self.stream.isatty() and not backend.under_launcher() else "epoch"
        self.mode, self.progress, self.interval = mode, progress, interval

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.epoch_start = self.last_line = time.perf_counter()
        self.done = 0
        if self.mode == "bar":
            self._line(f"Epoch {epoch + 1}/{self.progress.epochs}")
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
            self._line(f"  epoch {self.epoch + 1} step {self.done}/{steps}  "
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
            parts.append(f"(partial epoch: {self.done} of {self.progress.steps_per_epoch} steps, up to global step "
                         f"{end.global_step})")
        self._line(f"epoch {epoch + 1}/{self.progress.epochs}  " + "  ".join(parts))

    def _line(self, text: str) -> None:
        """One write per line: launchers tag output per write, so a line written in pieces gets split."""
        self.stream.write(text + "\n")
        self.stream.flush()


class ElasticCommit(keras.callbacks.Callback):
    """Copies the position into Horovod's elastic state and commits it every `every` steps and at epoch ends.
    A commit is also where Horovod interrupts training when hosts were added or removed (on every rank at once)."""

    def __init__(self, state, progress: Progress, every: int):
        super().__init__()
        self.state, self.progress, self.every = state, progress, every

    def _commit(self):
        p = self.progress.position
        self.state.epoch, self.state.step_in_epoch, self.state.global_step = p.epoch, p.step_in_epoch, p.global_step
        self.state.commit()

    def on_train_batch_end(self, batch, logs=None):
        if self.progress.position.global_step % self.every == 0:
            self._commit()

    def on_epoch_end(self, epoch, logs=None):
        self._commit()


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


def ordered(world, progress: Progress, run_dir, options: Options, *, stop: StopRequest, checkpointer, global_batch: int,
            local_state: LocalState, evaluate=None, elastic_state=None) -> list:
    """The full list in its one correct order. Rank-0 writers are simply absent on other ranks. The elastic commit
    comes last, so an interruption it raises never skips an epoch's writers."""
    callbacks = [
        Watchdog(options.stall_timeout_s, world.rank, run_dir),
        StartCheck(world, elastic=elastic_state is not None),
        TrackPosition(progress),
        AgreedStop(world, progress, stop, options.check_every_steps),
        StepCheckpoint(progress, checkpointer, world, options.checkpoint_every_steps, options.checkpoint_every_epochs,
                       local_state),
        MetricAverage(world),
        Throughput(progress, global_batch, world.size),
    ]
    if evaluate is not None:
        callbacks.append(ExactEvaluation(evaluate, progress, local_state))
    callbacks.append(EpochHistory(progress))
    if world.is_chief:
        callbacks.append(ProgressLogger(options.progress, progress))
        if options.csv:
            callbacks.append(keras.callbacks.CSVLogger(str(run_dir / "metrics.csv"), append=True))
        if options.tensorboard:
            callbacks.append(keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), write_graph=False,
                                                         profile_batch=0))
    if elastic_state is not None:
        callbacks.append(ElasticCommit(elastic_state, progress, options.check_every_steps))
    return callbacks
