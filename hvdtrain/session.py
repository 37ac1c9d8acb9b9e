"""A training session in a run directory: what `hvdtrain train` and the Keras API share, so each reliability
behaviour exists once: resume, the loop controller, the guard around the loop, and the finish (checkpoint, replica
check, summary.json). The strategy (strategies/) answers what differs between ways of training: which checkpoint
part a rank writes, what a checkpoint must match, its summary entries. The Trainer builds a session from the config;
hvdtrain.keras.Run from keyword arguments.
"""
from __future__ import annotations

import contextlib
import json
import time

from hvdtrain import backend, checkpoint, strategies
from hvdtrain.backend import traffic
from hvdtrain.checkpoint import Checkpointer, Position
from hvdtrain.errors import NonFiniteLoss
from hvdtrain.log import get_logger
from hvdtrain.loop import agreement, display
from hvdtrain.loop.averages import LocalState
from hvdtrain.loop.controller import LoopController
from hvdtrain.loop.progress import Options, Progress
from hvdtrain.loop.stop import StopRequest
from hvdtrain.rundir import RunDir


class Session:
    def __init__(self, world, run: RunDir, strategy, *, steps_per_epoch: int, epochs: int, global_batch: int,
                 options: Options, stop: StopRequest, meta: dict, elastic: bool = False):
        self.world, self.run, self.strategy, self.options, self.stop = world, run, strategy, options, stop
        self.elastic = elastic   # Horovod Elastic (trainer.elastic): it resets on failures and agrees by committing
        self.global_batch = global_batch
        self.progress = Progress(steps_per_epoch, epochs)
        self.meta = meta
        self.local_state = LocalState(world)
        self.controller = None
        self._checkpointer = None
        self.start = Position()
        self.resumed_from = None
        self.started = time.perf_counter()
        self.sent_at_start = backend.sent_bytes()
        self.log = get_logger(world.rank)

    def adopt(self, strategy) -> None:
        """Train with another strategy (the Keras API's pipeline, made after the run)."""
        self.strategy, self._checkpointer = strategy, None

    @property
    def checkpointer(self) -> Checkpointer:
        """Rank 0 writes (others hold a no-op), or each rank its strategy's part."""
        if self._checkpointer is None:
            part, writes = self.strategy.checkpoint_part
            self._checkpointer = Checkpointer.for_part(self.world, self.run, self.meta, self.options.keep_checkpoints,
                                                       part, writes, self.strategy.write_part)
        return self._checkpointer

    def resume(self, model, signature: dict, mode: str = "auto") -> Position:
        """Restore the latest checkpoint (model + optimizer) on every rank alike; returns where training continues.
        `signature`: the whole model's (checkpoint.signature); the strategy adds the layout it cannot leave."""
        self.strategy.check(model)
        backend.build_optimizer(model.optimizer, model.trainable_variables)   # slots must exist before a restore
        signature = self.strategy.signature(signature)
        self.meta["signature"] = signature
        part, _ = self.strategy.checkpoint_part
        self.start, self.resumed_from = checkpoint.resume(self.run, model, mode, signature, agree=not self.elastic,
                                                          part=part, check_layout=strategies.check_layout,
                                                          restore_with=self.strategy.restore)
        self.progress.position = self.start
        self.checkpointer.last_step = self.start.global_step if self.resumed_from else -1
        if self.resumed_from:
            done = f"{self.start.epoch} of {self.progress.epochs} epochs" + \
                (f" + {self.start.step_in_epoch} steps" if self.start.step_in_epoch else "")
            written = checkpoint.read_meta(self.resumed_from).get("num_ranks", self.world.size)
            moved = f"; written on {written} ranks, continuing on {self.world.size}" if written != self.world.size else ""
            self.log.info(f"resuming from {self.resumed_from} ({done} done{moved})")
        return self.start

    def rebind(self, world, position: Position) -> None:
        """After an elastic reset: the new world (rank 0 may be another process now) and the committed position."""
        last = self.checkpointer.last_step
        self.world = self.strategy.world = world
        self._checkpointer = None
        self.checkpointer.last_step = last
        self.local_state = LocalState(world)
        self.progress.position = position
        self.progress.stop_reason = ""

    def loop(self, evaluate=None, elastic_state=None, unit: str = "epoch") -> LoopController:
        """The loop controller of the next fit (or of a strategy's own loop), with rank 0's writers."""
        self.controller = LoopController(
            self.world, self.progress, self.options, strategy=self.strategy, stop=self.stop,
            checkpointer=self.checkpointer, global_batch=self.global_batch, local_state=self.local_state,
            run_dir=self.run.path, evaluate=evaluate, elastic_state=elastic_state,
            writers=display.writers(self.world, self.options, self.run.path, self.progress, unit))
        return self.controller

    @contextlib.contextmanager
    def guard(self, diagnose=None):
        """Around the loop: a data error in this rank's input pipeline is agreed with the peers (never a hang, never
        reported as a lost peer), a failed collective becomes a one-line CollectiveFailure, the watchdog stops."""
        try:
            yield
        except Exception as exc:
            if self.elastic:
                raise   # Horovod Elastic handles failed collectives itself: it resets and continues from the last commit
            agreement.data_error_during_fit(exc, self.progress, self.world, diagnose)
            p = self.progress.position
            failure = backend.collective_failure(exc, f"epoch {p.epoch + 1}, step {p.step_in_epoch}", self.run.path)
            if failure is not None:
                raise failure from None
            raise
        finally:
            if self.controller is not None:
                self.controller.stop()

    @property
    def status(self) -> str:
        if self.progress.stop_reason == "nonfinite":
            return "failed"
        done = self.progress.finished
        return "completed" if done and self.progress.stop_reason != "stop_requested" else "stopped"

    @property
    def trained_nothing(self) -> bool:
        """A rerun of a finished run: it resumed at the end and took no step."""
        return self.resumed_from is not None and self.start.global_step >= self.progress.total_steps

    def finish(self, model, evaluate=None) -> dict:
        """After the loop, on every rank: refuse a non-finite run, save the last checkpoint, check that the replicas
        are identical, and write summary.json (rank 0). `evaluate` gives the final held-out metrics (re-used from the
        last epoch's exact evaluation when that ran at this very step). A rerun that trained nothing leaves the
        summary the run wrote."""
        p = self.progress
        if p.stop_reason == "nonfinite":
            raise NonFiniteLoss(p.failure, agreed=True)
        self.local_state.sync(model, p.position.global_step)
        self.checkpointer.save(model, p.position, self.world.size)
        digest = checkpoint.agreed_digest(model, self.world)
        kept = backend.broadcast_object(self._kept_summary(digest) if self.world.is_chief else None,
                                        "hvdtrain.kept_summary")
        if kept is not None:
            self.log.info(f"nothing left to train: {self.run / 'summary.json'} is kept as the run that finished it "
                          "wrote it")
            return kept
        test = None
        if self.status == "completed" and evaluate is not None:
            step, metrics = p.last_eval
            test = metrics if step == p.position.global_step else evaluate(model)
        epochs_run = [h for h in p.history if h.get("samples_per_sec")]
        steady = epochs_run[1:] or epochs_run
        sent = traffic.since(self.sent_at_start, backend.sent_bytes())
        summary = {
            "status": self.status, "num_ranks": self.world.size, "num_hosts": self.world.cross_size,
            "controller": self.world.controller, "epochs": p.epochs, "epoch": p.position.epoch,
            "step_in_epoch": p.position.step_in_epoch, "global_step": p.position.global_step,
            **self.strategy.summary(model, self.global_batch),
            "samples_per_sec": sum(h["samples_per_sec"] for h in steady) / max(1, len(steady)),
            "sync": self.strategy.describe(),
            "train_loss": epochs_run[-1]["loss"] if epochs_run else None,
            "weights_sha256": digest, "wall_seconds": time.perf_counter() - self.started,
            # what the ranks handed to Horovod and MPI during this run (a resumed run counts from its resume): rank
            # 0's payload, and every rank's bytes by kind and dtype
            "communicated_bytes": traffic.payload(sent),
            "communicated": backend.allgather_object(sent, "hvdtrain.sent"),
            "memory": backend.allgather_object(self.strategy.memory(model), "hvdtrain.memory"),
        }
        summary.update({f"test_{k}": v for k, v in (test or {}).items()})
        if self.world.is_chief:
            self.run.write_summary(summary)
        if summary["status"] == "stopped":
            self.log.info(f"stopped at epoch {p.position.epoch + 1}, step {p.position.step_in_epoch} on request "
                          f"({p.requested_by or 'stop request'}); checkpoint written, rerun the same command to resume")
            self._serve_stop_file()
        return summary

    def _kept_summary(self, digest: str) -> dict | None:
        """Rank 0: the summary.json of a finished run this rerun trained nothing of (the same weights: the digest
        says so), to keep as it is."""
        path = self.run / "summary.json"
        if not self.trained_nothing or not path.is_file():
            return None
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return summary if summary.get("weights_sha256") == digest and summary.get("status") == "completed" else None

    def _serve_stop_file(self) -> None:
        """A RUN_DIR/STOP request is served once its checkpoint is written: rank 0 removes it, so a rerun resumes
        instead of stopping again."""
        if self.world.is_chief and self.stop.consume():
            self.log.info(f"removed {self.stop.stop_file}: its stop is done, so rerunning the same command resumes")
