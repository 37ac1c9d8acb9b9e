"""The training loop around Keras's steps, shared by `hvdtrain train` and the Keras API (through session.Session).

Keras sees two callbacks (see `ordered`): the watchdog, which ends a rank that stops making progress, and the
`Controller`, which owns the position and takes every decision in one readable order: the start check (distributed
optimizer, no XLA) and the broadcast of rank 0's state; after each step the agreed stop (non-finite loss or weights,
stop requests, a peer's data error, the last step), before anything writes a checkpoint; checkpoints; at epoch ends
metric averaging and exact evaluation before rank 0's writers, and the elastic commit last. Collectives run on every
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
from hvdtrain.sync import float_variables


@dataclass
class Progress:
    """The controller's state, read by the session: where training is, why it stopped, what each epoch gave."""
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
    appearing (hvdtrain sweep prunes trials this way); read by StopAgreement at the agreement steps. The file is a
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
    that is not distributed, an XLA-compiled train step), then make every rank start from rank 0's state (its
    weights only, when each rank keeps its own optimizer state: local SGD's, restored rank by rank)."""

    def __init__(self, world, elastic: bool = False, own_optimizer_state: bool = False):
        super().__init__()
        self.world, self.elastic, self.own_optimizer_state = world, elastic, own_optimizer_state

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
        shared = [] if self.own_optimizer_state else list(optimizer.variables)
        backend.broadcast_variables(list(model.variables) + shared, name="hvdtrain.start",
                                    group=self.world.replica_group)


class StopAgreement:
    """One all-reduce of a vector: per rank 'loss or weights not finite', 'a stop was requested', and 'I am here'. A
    rank that hit a data error has left with Horovod's join (its share of the vector reads zero), so the others see
    it, stop at the same step and report that rank's error, agreed. Every rank reaches the same verdict at the same
    step; the verdict goes into `progress.stop_reason`."""

    def __init__(self, world, progress: Progress, stop: StopRequest):
        self.world, self.progress, self.stop = world, progress, stop

    def _weights_finite(self, model) -> bool:
        if not hasattr(self, "_finite_fn"):   # traced once over the model's variables (one model per fit)
            import tensorflow as tf
            variables = model.trainable_variables
            self._finite_fn = tf.function(lambda: tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in variables]),
                                          autograph=False)   # plain ops: nothing for AutoGraph to convert
        return bool(self._finite_fn())

    def check(self, model, logs: dict) -> None:
        size = self.world.size
        # Weights too: a NaN gradient can leave the loss finite (e.g. ReLU maps NaN to 0) while the model is dead.
        healthy = math.isfinite(float(logs.get("loss", 0.0))) and self._weights_finite(model)
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
        elif total[size] > 0:
            self.progress.stop_reason = "stop_requested"
            self.progress.requested_by = self._who_asked()

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

    def synced_at(self, step: int) -> None:
        """The state was averaged at `step` already (with local SGD's weights)."""
        self._step = step

    def sync(self, model, step: int) -> None:
        """A collective for models with local state: every rank calls it at the same step."""
        if self.world.replicas == 1 or step == self._step:
            return
        if self._average is None:
            local = float_variables(model.non_trainable_variables)
            self._average = backend.variable_averager(local, "hvdtrain.local_state", self.world.replica_group) \
                if local else (lambda: None)
        self._average()
        self._step = step


class MetricAverage(keras.callbacks.Callback):
    """Epoch metrics averaged over ranks, keys in sorted order on every rank (one all-reduce)."""

    def __init__(self, world):
        super().__init__()
        self.world = world
        self._keys = None

    def on_epoch_end(self, epoch, logs=None):
        self.average(logs)

    def average(self, logs) -> None:
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


class Controller(keras.callbacks.Callback):
    """The training loop's decisions, in the order they are taken; Keras's fit only runs the steps.

    After every step: the position advances (the one step counter); at agreement steps (every `check_every_steps`
    steps of an epoch, each epoch's end, the last step) the ranks agree whether to stop; a checkpoint is written when
    one is due and the state is sound; the elastic state is committed. At every epoch end: the epoch's metrics are
    averaged over ranks, its throughput measured, the model evaluated exactly, the epoch recorded, then the writers
    (rank 0's progress, CSV, TensorBoard) see the result, and last the elastic commit (it may interrupt for a resize,
    so it never comes before an epoch is written). A stop request ends with a checkpoint at the agreed step.
    """

    def __init__(self, world, progress: Progress, options: Options, *, stop: StopRequest, checkpointer,
                 global_batch: int, local_state: LocalState, sync, evaluate=None, elastic_state=None, writers=()):
        super().__init__()
        self.world, self.progress, self.options = world, progress, options
        self.checkpointer, self.global_batch, self.local_state = checkpointer, global_batch, local_state
        self.sync = sync
        self.evaluate, self.elastic_state, self.writers = evaluate, elastic_state, list(writers)
        self.start_check = StartCheck(world, elastic=elastic_state is not None,
                                      own_optimizer_state=sync.plan.local_optimizer_state)
        self.agreement = StopAgreement(world, progress, stop)
        self.metrics = MetricAverage(world)

    # Keras hands the model and fit's parameters to this callback; the writers get them too.
    def set_model(self, model):
        super().set_model(model)
        for callback in (self.start_check, *self.writers):
            callback.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        for writer in self.writers:
            writer.set_params(params)

    def on_train_begin(self, logs=None):
        self.start_check.on_train_begin(logs)
        self.last_saved = self.progress.position.global_step   # a resume starts from its checkpoint
        self.sync.begin(self.last_saved)
        self._to_writers("on_train_begin", logs)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_started, self.epoch_steps, self.epoch_first = time.perf_counter(), 0, self.progress.position
        self._to_writers("on_epoch_begin", epoch, logs)

    def on_train_batch_begin(self, batch, logs=None):
        self._to_writers("on_train_batch_begin", batch, logs)

    def on_train_batch_end(self, batch, logs=None):
        p = self.progress
        p.advance()
        self.epoch_steps += 1
        at, last = p.position, p.position.global_step >= p.total_steps
        averaged = self.sync.after_step(self.model, at.global_step)
        if averaged:
            self.local_state.synced_at(at.global_step)   # the weight average covered the batch-norm statistics
        # Local SGD's replicas differ between weight averages: agree (and checkpoint) only at the averages.
        agreed = averaged if self.sync.plan.local_after(at.global_step) else \
            at.step_in_epoch % self.options.check_every_steps == 0 or last
        if agreed:
            self.agreement.check(self.model, logs or {})
        if p.stop_reason or last:   # a resumed run's last Keras epoch would run past the end otherwise
            self.model.stop_training = True
        if agreed and self._checkpoint_due(at, last):
            self._save(at)
        self._to_writers("on_train_batch_end", batch, logs)
        if at.global_step % self.options.check_every_steps == 0:
            self._commit()   # last: it may interrupt for a resize

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        self.metrics.average(logs)
        self._throughput(logs)
        if self.evaluate is not None:
            self.local_state.sync(self.model, self.progress.position.global_step)
            metrics = self.evaluate(self.model)
            self.progress.last_eval = (self.progress.position.global_step, metrics)
            logs.update({f"val_{k}": v for k, v in (metrics or {}).items() if k != "examples" and isinstance(v, float)})
        self.progress.history.append({"epoch": epoch + 1, **{k: float(v) for k, v in logs.items() if _is_number(v)}})
        self._to_writers("on_epoch_end", epoch, logs)
        self._commit()

    def on_train_end(self, logs=None):
        if self.progress.stop_reason == "stop_requested":   # preemption: the checkpoint at the agreed stop step
            self._save(self.progress.position)
        self._to_writers("on_train_end", logs)

    # Evaluation or prediction inside fit (e.g. the Keras API's validation_data): the writers follow it as before.
    def on_test_begin(self, logs=None):
        self._to_writers("on_test_begin", logs)

    def on_test_end(self, logs=None):
        self._to_writers("on_test_end", logs)

    def on_test_batch_begin(self, batch, logs=None):
        self._to_writers("on_test_batch_begin", batch, logs)

    def on_test_batch_end(self, batch, logs=None):
        self._to_writers("on_test_batch_end", batch, logs)

    def _checkpoint_due(self, at, last: bool) -> bool:
        """At an agreement step (so only weights all ranks found finite are saved): every `checkpoint_every_epochs`-th
        epoch end, the last step, and the first agreement step `checkpoint_every_steps` or more after the last
        checkpoint; never once the agreement found non-finite values or a peer's data error."""
        if self.progress.stop_reason in ("nonfinite", "data_error"):
            return False
        every_steps, every_epochs = self.options.checkpoint_every_steps, self.options.checkpoint_every_epochs
        epoch_end = at.step_in_epoch == 0 and at.epoch % every_epochs == 0
        return epoch_end or last or bool(every_steps and at.global_step - self.last_saved >= every_steps)

    def _save(self, at) -> None:
        self.local_state.sync(self.model, at.global_step)
        self.checkpointer.save(self.model, at, self.world.size)
        self.last_saved = at.global_step

    def _throughput(self, logs: dict) -> None:
        """Samples/s of this Keras epoch, global and per rank, and whether it was partial (stopped mid-epoch, or a
        resume that started mid-epoch)."""
        seconds = max(time.perf_counter() - self.epoch_started, 1e-9)
        logs["samples_per_sec"] = self.epoch_steps * self.global_batch / seconds
        logs["samples_per_sec_per_rank"] = logs["samples_per_sec"] / self.world.size
        logs["epoch_seconds"] = seconds
        logs["global_step"] = self.progress.position.global_step
        sent = self.sync.communicated_bytes(self.model, self.progress.position.global_step)
        if sent is not None:
            logs["communicated_bytes"] = sent - self.sync.communicated_bytes(self.model, self.epoch_first.global_step)
        logs["partial"] = int(self.epoch_steps < self.progress.steps_per_epoch or self.epoch_first.step_in_epoch != 0)

    def _commit(self) -> None:
        """Horovod Elastic: the position into the elastic state, committed (where Horovod interrupts for a resize)."""
        if self.elastic_state is None:
            return
        p, state = self.progress.position, self.elastic_state
        state.epoch, state.step_in_epoch, state.global_step = p.epoch, p.step_in_epoch, p.global_step
        state.commit()

    def _to_writers(self, hook: str, *args) -> None:
        for writer in self.writers:
            getattr(writer, hook)(*args)


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
            local_state: LocalState, sync, evaluate=None, elastic_state=None) -> list:
    """What Keras calls: the watchdog's heartbeat, then the controller, which runs the rest in its order (rank 0's
    writers are simply absent on other ranks)."""
    writers = []
    if world.is_chief:
        writers.append(ProgressLogger(options.progress, progress))
        if options.csv:
            writers.append(keras.callbacks.CSVLogger(str(run_dir / "metrics.csv"), append=True))
        if options.tensorboard:
            writers.append(keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), write_graph=False, profile_batch=0))
    return [Watchdog(options.stall_timeout_s, world.rank, run_dir),
            Controller(world, progress, options, stop=stop, checkpointer=checkpointer, global_batch=global_batch,
                       local_state=local_state, sync=sync, evaluate=evaluate, elastic_state=elastic_state,
                       writers=writers)]
