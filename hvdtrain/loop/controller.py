"""The training loop's decisions as a plain object, whoever runs the steps: Keras's fit (through loop/fit.py's
FitHooks) or a strategy's own loop (federated rounds call it directly, one round an epoch).

After every step: the position advances (the one step counter); the strategy does its per-step part (local SGD's
weight average); at agreement steps (every `check_every_steps` steps of an epoch, each epoch's end, the last step;
only where the replicas are one model) the ranks agree whether to stop, before anything writes a checkpoint; a
checkpoint is written when one is due and the state is sound; the elastic state is committed. At every epoch end:
the epoch's metrics are averaged over ranks, its throughput and bytes measured, the model evaluated exactly, the
epoch recorded, then rank 0's writers (progress, CSV, TensorBoard) see the result, and last the elastic commit (it
may interrupt for a resize, so it never comes before an epoch is written). A stop request ends with a checkpoint at
the agreed step. Collectives run on every rank, in the same order; only the writers are rank 0's. Everything keys
on the true position (global step), so it stays right when a resumed run's Keras epochs start mid-epoch.
"""
from __future__ import annotations

import time

from hvdtrain import backend
from hvdtrain.backend import traffic
from hvdtrain.loop.agreement import StopAgreement
from hvdtrain.loop.averages import MetricAverage, is_number
from hvdtrain.loop.watchdog import Watchdog


class LoopController:
    def __init__(self, world, progress, options, *, strategy, stop, checkpointer, global_batch: int, local_state,
                 run_dir, evaluate=None, elastic_state=None, writers=()):
        self.world, self.progress, self.options, self.strategy = world, progress, options, strategy
        self.checkpointer, self.global_batch, self.local_state = checkpointer, global_batch, local_state
        self.evaluate, self.elastic_state, self.writers = evaluate, elastic_state, list(writers)
        self.watchdog = Watchdog(options.stall_timeout_s, world.rank, run_dir)
        self.agreement = StopAgreement(world, progress, stop)
        self.metrics = MetricAverage(world)
        self.model = None

    def attach(self, model, params: dict | None = None) -> None:
        """The model the loop trains (and fit's parameters): the writers get them too."""
        self.model = model
        for writer in self.writers:
            writer.set_model(model)
            if params is not None:
                writer.set_params(params)

    # ---- the loop's hooks, in the order a loop calls them ---------------------------------------------------------

    def train_begin(self, logs=None) -> None:
        self.watchdog.start()
        self.strategy.start(self.model, elastic=self.elastic_state is not None)   # every rank from rank 0's state
        self.last_saved = self.progress.position.global_step   # a resume starts from its checkpoint
        self.strategy.begin(self.last_saved)
        self._to_writers("on_train_begin", logs)

    def epoch_begin(self, epoch: int, logs=None) -> None:
        self.watchdog.beat()
        self.epoch_started, self.epoch_steps, self.epoch_samples = time.perf_counter(), 0, 0
        self.epoch_first, self.epoch_sent = self.progress.position, backend.sent_bytes()
        self._to_writers("on_epoch_begin", epoch, logs)

    def step_begin(self, batch: int, logs=None) -> None:
        self._to_writers("on_train_batch_begin", batch, logs)

    def step_end(self, batch: int, logs=None, samples: int | None = None) -> bool:
        """After a step of `samples` examples (default: the global batch); True when training must stop here."""
        self.watchdog.arm()
        p = self.progress
        p.advance()
        self.epoch_steps += 1
        self.epoch_samples += self.global_batch if samples is None else samples
        at, last = p.position, p.finished
        averaged = self.strategy.after_step(self.model, at.global_step)
        if averaged:
            self.local_state.synced_at(at.global_step)   # the weight average covered the batch-norm statistics
        agreed = self.strategy.one_model_after(at.global_step) and \
            (averaged or at.step_in_epoch % self.options.check_every_steps == 0 or last)
        if agreed:
            self.agreement.check(self.model, logs or {})
        if agreed and self._checkpoint_due(at, last):
            self._save(at)
        self._to_writers("on_train_batch_end", batch, logs)
        if at.global_step % self.options.check_every_steps == 0:
            self._commit()   # last: it may interrupt for a resize
        return bool(p.stop_reason) or last   # a resumed run's last Keras epoch would run past the end otherwise

    def epoch_end(self, epoch: int, logs=None, averaged: bool = False) -> None:
        """`averaged`: the logs are every rank's already (a federated round's)."""
        self.watchdog.beat()
        logs = logs if logs is not None else {}
        if not averaged:
            self.metrics.average(logs)
        self._throughput(logs)
        if self.evaluate is not None:
            self.local_state.sync(self.model, self.progress.position.global_step)
            metrics = self.evaluate(self.model)
            self.progress.last_eval = (self.progress.position.global_step, metrics)
            logs.update({f"val_{k}": v for k, v in (metrics or {}).items() if k != "examples" and isinstance(v, float)})
        self.progress.history.append({"epoch": epoch + 1, **{k: float(v) for k, v in logs.items() if is_number(v)}})
        self._to_writers("on_epoch_end", epoch, logs)
        self._commit()

    def train_end(self, logs=None) -> None:
        if self.progress.stop_reason == "stop_requested":   # preemption: the checkpoint at the agreed stop step
            self._save(self.progress.position)
        self._to_writers("on_train_end", logs)
        self.watchdog.stop()

    def test_hook(self, hook: str, *args) -> None:
        """Evaluation inside fit (e.g. the Keras API's validation_data): progress, and the writers follow it."""
        self.watchdog.beat()
        self._to_writers(hook, *args)

    def stop(self) -> None:
        """After a failure (Keras skips on_train_end when fit raises): the watchdog stops watching."""
        self.watchdog.stop()

    # ---- the decisions ----------------------------------------------------------------------------------------------

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
        """Samples/s of this epoch, global and per rank, the payload bytes this rank sent, and whether the epoch was
        partial (stopped mid-epoch, or a resume that started mid-epoch)."""
        seconds = max(time.perf_counter() - self.epoch_started, 1e-9)
        logs["samples_per_sec"] = self.epoch_samples / seconds
        logs["samples_per_sec_per_rank"] = logs["samples_per_sec"] / self.world.size
        logs["epoch_seconds"] = seconds
        logs["global_step"] = self.progress.position.global_step
        logs["communicated_bytes"] = traffic.payload(traffic.since(self.epoch_sent, backend.sent_bytes()))
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
