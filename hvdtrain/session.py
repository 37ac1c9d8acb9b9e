"""A training session in a run directory: what `hvdtrain train` and the Keras API share, so each reliability
behaviour exists once: resume, the callbacks in their order, the guard around fit, and the finish (checkpoint,
replica check, summary.json). The Trainer builds one from the config; hvdtrain.keras.Run from keyword arguments.
"""
from __future__ import annotations

import contextlib
import time

from hvdtrain import callbacks as cb
from hvdtrain import backend, checkpoint
from hvdtrain.checkpoint import Checkpointer, Position
from hvdtrain.errors import NonFiniteLoss
from hvdtrain.log import get_logger
from hvdtrain.rundir import RunDir
from hvdtrain.sync import Synchronizer, SyncPlan


class Session:
    def __init__(self, world, run: RunDir, *, steps_per_epoch: int, epochs: int, global_batch: int,
                 options: cb.Options, stop: cb.StopRequest, meta: dict, elastic: bool = False,
                 sync: Synchronizer | None = None):
        self.world, self.run, self.options, self.stop = world, run, options, stop
        self.sync = sync or Synchronizer(SyncPlan(steps_per_epoch=steps_per_epoch), world)
        self.per_rank = self.sync.plan.local_optimizer_state
        self.elastic = elastic   # Horovod Elastic (trainer.elastic): it resets on failures and agrees by committing
        self.global_batch = global_batch
        self.progress = cb.Progress(steps_per_epoch, epochs)
        self.checkpointer = Checkpointer.for_rank(world, run, meta, options.keep_checkpoints, self.per_rank)
        self.local_state = cb.LocalState(world)
        self.start = Position()
        self.resumed_from = None
        self.started = time.perf_counter()
        self.log = get_logger(world.rank)

    def resume(self, model, signature: dict, mode: str = "auto") -> Position:
        """Restore the latest checkpoint (model + optimizer) on every rank alike; returns where training continues."""
        optimizer = model.optimizer
        backend.build_optimizer(optimizer, model.trainable_variables)   # slots must exist before a restore
        if self.per_rank:
            signature = {**signature, "per_rank": self.world.size}
        self.checkpointer.meta["signature"] = signature
        self.start, self.resumed_from = checkpoint.resume(self.run, model, self.world, mode, signature,
                                                          agree=not self.elastic, per_rank=self.per_rank)
        self.progress.position = self.start
        self.checkpointer.last_step = self.start.global_step if self.resumed_from else -1
        if self.resumed_from:
            done = f"{self.start.epoch} of {self.progress.epochs} epochs" + \
                (f" + {self.start.step_in_epoch} steps" if self.start.step_in_epoch else "")
            self.log.info(f"resuming from {self.resumed_from} ({done} done)")
        return self.start

    def rebind(self, world, position: Position) -> None:
        """After an elastic reset: the new world (rank 0 may be another process now) and the committed position."""
        last = self.checkpointer.last_step
        self.world = world
        self.checkpointer = Checkpointer.for_rank(world, self.run, self.checkpointer.meta, self.options.keep_checkpoints,
                                                  self.per_rank)
        self.checkpointer.last_step = last
        self.local_state = cb.LocalState(world)
        self.progress.position = position
        self.progress.stop_reason = ""

    def callbacks(self, evaluate=None, elastic_state=None) -> list:
        return cb.ordered(self.world, self.progress, self.run.path, self.options, stop=self.stop,
                          checkpointer=self.checkpointer, global_batch=self.global_batch,
                          local_state=self.local_state, sync=self.sync, evaluate=evaluate,
                          elastic_state=elastic_state)

    @contextlib.contextmanager
    def guard(self, callbacks, diagnose=None):
        """Around model.fit: a data error in this rank's input pipeline is agreed with the peers (never a hang, never
        reported as a lost peer), a failed collective becomes a one-line CollectiveFailure, watchdogs stop."""
        try:
            yield
        except Exception as exc:
            if self.elastic:
                raise   # Horovod Elastic handles failed collectives itself: it resets and continues from the last commit
            cb.data_error_during_fit(exc, self.progress, self.world, diagnose)
            p = self.progress.position
            failure = backend.collective_failure(exc, f"epoch {p.epoch + 1}, step {p.step_in_epoch}", self.run.path)
            if failure is not None:
                raise failure from None
            raise
        finally:
            cb.stop_watchdogs(callbacks)

    @property
    def status(self) -> str:
        if self.progress.stop_reason == "nonfinite":
            return "failed"
        done = self.progress.position.global_step >= self.progress.total_steps
        return "completed" if done and self.progress.stop_reason != "stop_requested" else "stopped"

    def finish(self, model, evaluate=None, extra: dict | None = None) -> dict:
        """After fit, on every rank: refuse a non-finite run, save the last checkpoint, check that the replicas are
        identical, and write summary.json (rank 0). `evaluate` gives the final held-out metrics (re-used from the last
        epoch's exact evaluation when that ran at this very step)."""
        p = self.progress
        if p.stop_reason == "nonfinite":
            raise NonFiniteLoss(p.failure, agreed=True)
        self.local_state.sync(model, p.position.global_step)
        self.checkpointer.save(model, p.position, self.world.size)
        digest = checkpoint.agreed_digest(model, self.world)
        test = None
        if self.status == "completed" and evaluate is not None:
            step, metrics = p.last_eval
            test = metrics if step == p.position.global_step else evaluate(model)
        epochs_run = [h for h in p.history if h.get("samples_per_sec")]
        steady = epochs_run[1:] or epochs_run
        summary = {
            "status": self.status, "num_ranks": self.world.size, "num_hosts": self.world.cross_size,
            "controller": self.world.controller, "epochs": p.epochs, "epoch": p.position.epoch,
            "step_in_epoch": p.position.step_in_epoch, "global_step": p.position.global_step,
            "global_batch_size": self.global_batch, "optimizer_steps": int(model.optimizer.iterations.numpy()),
            "samples_per_sec": sum(h["samples_per_sec"] for h in steady) / max(1, len(steady)),
            "sync": self.sync.describe(),
            "train_loss": epochs_run[-1]["loss"] if epochs_run else None,
            "weights_sha256": digest, "wall_seconds": time.perf_counter() - self.started,
        }
        sent = self.sync.communicated_bytes(model, p.position.global_step)
        if sent is not None:
            summary["communicated_bytes"] = sent
        summary.update({f"test_{k}": v for k, v in (test or {}).items()})
        summary.update(extra or {})
        if self.world.is_chief:
            self.run.write_summary(summary)
        if summary["status"] == "stopped":
            self.log.info(f"stopped at epoch {p.position.epoch + 1}, step {p.position.step_in_epoch} on request "
                          f"({p.requested_by or 'stop request'}); checkpoint written, rerun the same command to resume")
            self._serve_stop_file()
        return summary

    def _serve_stop_file(self) -> None:
        """A RUN_DIR/STOP request is served once its checkpoint is written: rank 0 removes it, so a rerun resumes
        instead of stopping again."""
        if self.world.is_chief and self.stop.consume():
            self.log.info(f"removed {self.stop.stop_file}: its stop is done, so rerunning the same command resumes")


def fit_segments(model, batches_from, session: Session, callbacks, verbose: int = 0, diagnose=None,
                 **fit_kwargs) -> None:
    """model.fit from the session's start to the end, in whole epochs: first the rest of a partly trained epoch (a
    resume after a mid-epoch stop), then the remaining epochs, so every later epoch ends where it would have without
    the stop. `batches_from(first_epoch, epochs, skip)` gives the per-rank stream. Both entrances fit through here."""
    p, steps, epochs = session.progress, session.progress.steps_per_epoch, session.progress.epochs
    fit = dict(callbacks=callbacks, verbose=verbose, shuffle=False, **fit_kwargs)
    with session.guard(callbacks, diagnose):
        start = p.position
        if start.step_in_epoch and start.epoch < epochs:
            model.fit(batches_from(start.epoch, start.epoch + 1, start.step_in_epoch), epochs=start.epoch + 1,
                      initial_epoch=start.epoch, steps_per_epoch=steps - start.step_in_epoch, **fit)
            if p.stop_reason:
                return
        start = p.position
        if start.epoch < epochs:
            model.fit(batches_from(start.epoch, epochs, 0), epochs=epochs, initial_epoch=start.epoch,
                      steps_per_epoch=steps, **fit)
