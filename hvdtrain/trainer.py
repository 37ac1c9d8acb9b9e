"""Trainer(cfg).fit(): init -> data -> model -> resume -> fit -> evaluate -> summary. Runs inside every rank."""
from __future__ import annotations

import time
from pathlib import Path

from hvdtrain import checkpoint, config, data, dist, models, optim, predict, runtime
from hvdtrain.callbacks import NonFiniteLoss, Position, StopRequest, build_callbacks, stop_watchdogs
from hvdtrain.errors import UserError
from hvdtrain.log import get_logger


class Trainer:
    def __init__(self, cfg: config.Config, stop: StopRequest | None = None):
        self.cfg = cfg
        self.stop = stop or StopRequest()
        self.elastic = cfg.trainer.elastic

    def fit(self) -> dict:
        cfg, started = self.cfg, time.perf_counter()
        runtime.check_versions()
        topo = self.topo = dist.init(cfg.runtime)
        log = get_logger(topo.rank)
        self._together(lambda: self._check_launch(), "hvdtrain.check_world")
        runtime.configure(cfg.runtime, topo.local_size)
        run_dir = self.run_dir = self._together(lambda: checkpoint.prepare_run_dir(cfg.trainer.run_dir), "hvdtrain.run_dir")
        log.info(f"{topo.size} rank(s) on {topo.cross_size} host(s), controller {topo.controller}; run directory {run_dir}")

        shape = self._together(lambda: data.input_shape(cfg.data), "hvdtrain.input_shape")
        model = models.build_model(cfg.model, shape, cfg.data.num_classes)
        steps = self.steps = self._steps_per_epoch(topo)
        base_optimizer = optim.build_optimizer(cfg.optim, topo.size, steps, cfg.trainer.epochs)
        model.compile(optimizer=dist.wrap_optimizer(base_optimizer, cfg.optim),
                      loss=_loss(), metrics=["accuracy"])
        model.optimizer.build(model.trainable_variables)  # create slots now so a checkpoint restores them
        self.signature = checkpoint.signature(model, shape, cfg.data.num_classes, cfg.model.name)
        position = self._together(lambda: self._resume(run_dir, model), "hvdtrain.resume")
        self.model, self.position = model, position
        if topo.is_chief:
            checkpoint.write_atomic(run_dir / "config.yaml", cfg.to_yaml())
        try:
            if self.elastic:
                self._fit_elastic(model, position, steps)
            else:
                self._fit_from(position, model, steps, self._callbacks(position, steps))
        except Exception as exc:
            if not dist.is_collective_failure(exc):
                raise
            raise dist.CollectiveFailure(
                f"rank {self.topo.rank}: a collective failed at epoch {position.epoch + 1}, step {position.step_in_epoch} "
                f"({_first_line(exc)}): a peer rank died, stalled or lost its network. The checkpoints in "
                f"{run_dir}/checkpoints are intact: rerun the same command to resume.") from None
        return self._finish(run_dir, model, position, started, log)

    def _together(self, fn, name):
        """Errors stop all ranks together. Not in elastic mode: a joining worker must not run collectives
        before Horovod's elastic sync, and every worker reads the same files, so local checks suffice there."""
        return fn() if self.elastic else dist.agree_on_errors(fn, name)

    def _check_launch(self) -> None:
        config.check_world(self.cfg, self.topo.size)
        if self.elastic and not dist.launched_elastic():
            raise UserError("trainer.elastic=true needs Horovod's elastic launcher: horovodrun --gloo --min-np 1 --max-np N "
                            "--host-discovery-script scripts/discover-hosts.sh hvdtrain train --elastic ...")
        if self.elastic and self.cfg.data.source == "tfrecord":
            raise UserError("elastic training supports in-memory sources (digits, synthetic, npz): TFRecord shards and "
                            "step counts depend on the number of ranks; convert the data to .npz or train without --elastic")

    def _save(self) -> None:
        """Rank 0 writes the current position (the rank can change after an elastic reset, so it is read now)."""
        if self.topo.is_chief:
            p, cfg = self.position, self.cfg
            meta = {"epoch": p.epoch, "step_in_epoch": p.step_in_epoch, "global_step": p.global_step,
                    "data_seed": cfg.data.seed, "num_ranks": self.topo.size, "signature": self.signature,
                    "config": cfg.to_dict()}
            checkpoint.save(self.run_dir, self.model, self.model.optimizer, meta, cfg.trainer.keep_checkpoints)

    def _callbacks(self, position: Position, steps: int, elastic_state=None) -> list:
        return build_callbacks(self.cfg, self.topo, self.run_dir, position=position, stop=self.stop,
                               steps_per_epoch=steps, save_fn=self._save, elastic_state=elastic_state,
                               evaluate_fn=lambda m: predict.evaluate(m, self.cfg.data, self.topo, "test"))

    def _fit_elastic(self, model, position: Position, steps: int) -> None:
        """Horovod Elastic: after a worker leaves or joins, every worker restarts this function from the last
        commit with the new world size. A global batch holds the same examples whatever the size."""
        state = dist.elastic_state(lambda: model.variables + model.optimizer.variables, epoch=position.epoch,
                                   step_in_epoch=position.step_in_epoch, global_step=position.global_step)

        @dist.elastic_run
        def train(state):
            self.topo = dist.current_topology()
            config.check_world(self.cfg, self.topo.size)
            position.epoch, position.step_in_epoch, position.global_step = state.epoch, state.step_in_epoch, state.global_step
            get_logger(self.topo.rank).info(f"elastic: {self.topo.size} rank(s) from epoch {position.epoch + 1}, "
                                            f"step {position.step_in_epoch} (global step {position.global_step})")
            self._fit_from(position, model, steps, self._callbacks(position, steps, state))
        train(state)

    # ------------------------------------------------------------------ steps

    def _steps_per_epoch(self, topo) -> int:
        """The same number on every rank: the MIN of what each shard can feed (uneven counts make Horovod hang).
        Counting (which may fail on bad data) runs inside the error agreement; the reduction runs after it."""
        local = self._together(lambda: data.local_steps(self.cfg.data, topo, self.cfg.trainer.global_batch_size),
                               "hvdtrain.steps")
        steps = local if topo.size == 1 or self.elastic else int(dist.allreduce_min([local], "hvdtrain.agreed_steps")[0])
        if steps == 0:
            raise _agreed(UserError(f"a rank's TFRecord shard has fewer than one per-rank batch of examples "
                                    f"({self.cfg.trainer.global_batch_size} // {topo.size}); lower "
                                    "trainer.global_batch_size or add data"))
        return steps

    def _train_stream(self, topo, first_epoch, skip, epochs):
        return data.train_data(self.cfg.data, topo, self.cfg.trainer.global_batch_size, first_epoch, epochs, skip,
                               steps=self.steps)

    def _resume(self, run_dir: Path, model) -> Position:
        mode = self.cfg.trainer.resume
        latest = str(checkpoint.latest(run_dir) or "")
        if self.topo.size > 1 and not self.elastic:
            # Rank 0's view decides, so ranks on nodes without the shared file system cannot disagree silently.
            latest = dist.broadcast_object(latest, "hvdtrain.latest")
        if not latest:
            if mode == "always":
                raise UserError(f"trainer.resume=always but {run_dir} holds no checkpoint; train first or use resume=auto")
            self._resumed_step = -1
            return Position()
        if mode == "never":
            raise UserError(f"{run_dir} already holds checkpoint {Path(latest).name} and trainer.resume=never; "
                            "use a fresh --trainer.run_dir or --resume")
        meta = checkpoint.read_meta(Path(latest))
        checkpoint.check_compatible(Path(latest), meta, self.signature)
        checkpoint.restore(Path(latest), model, model.optimizer)
        done = f"{meta['epoch']} of {self.cfg.trainer.epochs} epochs" + (f" + {meta['step_in_epoch']} steps" if meta["step_in_epoch"] else "")
        get_logger(self.topo.rank).info(f"resuming from {latest} ({done} done)")
        self._resumed_step = meta["global_step"]
        return Position(meta["epoch"], meta["step_in_epoch"], meta["global_step"])

    def _fit_from(self, position: Position, model, steps: int, callbacks) -> None:
        try:
            self._fit_segments(position, model, steps, callbacks)
        finally:
            stop_watchdogs(callbacks)

    def _fit_segments(self, position: Position, model, steps: int, callbacks) -> None:
        """Finish a partly trained epoch first (resume after a mid-epoch stop), then the remaining whole epochs."""
        epochs = self.cfg.trainer.epochs
        if position.step_in_epoch and position.epoch < epochs:
            partial = self._train_stream(self.topo, position.epoch, position.step_in_epoch, position.epoch + 1)
            model.fit(partial.dataset, epochs=position.epoch + 1, initial_epoch=position.epoch,
                      steps_per_epoch=steps - position.step_in_epoch, callbacks=callbacks, verbose=0)
            if position.stop_reason:
                return
        if position.epoch < epochs:
            stream = self._train_stream(self.topo, position.epoch, 0, epochs)
            model.fit(stream.dataset, epochs=epochs, initial_epoch=position.epoch, steps_per_epoch=steps,
                      callbacks=callbacks, verbose=0)

    # ------------------------------------------------------------------ the end

    def _finish(self, run_dir: Path, model, position: Position, started: float, log) -> dict:
        cfg, topo = self.cfg, self.topo
        if position.stop_reason == "nonfinite":
            raise _agreed(NonFiniteLoss(position.failure))
        if position.global_step != self._resumed_step:
            self._save()
        digests = dist.allgather_object(dist.weights_digest(model), "hvdtrain.digest") if topo.size > 1 else [dist.weights_digest(model)]
        if len(set(digests)) != 1:
            raise UserError(f"replicas diverged: weight digests differ across ranks {digests}; this is a bug, please report it")
        status = "stopped" if position.stop_reason == "stop_requested" else "completed"
        test = predict.evaluate(model, cfg.data, topo, "test") if status == "completed" else None
        epochs_run = [h for h in position.history if h.get("samples_per_sec")]
        steady = epochs_run[1:] or epochs_run
        summary = {
            "status": status, "num_ranks": topo.size, "num_hosts": topo.cross_size, "controller": topo.controller,
            "epochs": cfg.trainer.epochs, "epoch": position.epoch, "step_in_epoch": position.step_in_epoch,
            "global_step": position.global_step, "global_batch_size": cfg.trainer.global_batch_size,
            "optimizer_steps": int(model.optimizer.iterations.numpy()),
            "samples_per_sec": sum(h["samples_per_sec"] for h in steady) / max(1, len(steady)),
            "train_loss": epochs_run[-1]["loss"] if epochs_run else None,
            "test_loss": test["loss"] if test else None, "test_accuracy": test["accuracy"] if test else None,
            "test_examples": test["examples"] if test else None,
            "weights_sha256": digests[0], "wall_seconds": time.perf_counter() - started,
        }
        if topo.is_chief:
            if status == "completed":
                _export_model(model, run_dir)
            checkpoint.write_json(run_dir / "summary.json", summary)
            if status == "stopped":
                log.info(f"stopped at epoch {position.epoch + 1}, step {position.step_in_epoch} on request "
                         f"({self.stop.signal_name or 'stop flag'}); checkpoint written, rerun the same command to resume")
            elif test:
                log.info(f"test accuracy {test['accuracy']:.4f}  test loss {test['loss']:.4f}  "
                         f"({test['examples']} held-out examples, {topo.size} ranks, {summary['samples_per_sec']:,.0f} samples/s)")
        return summary


def _agreed(error: UserError) -> UserError:
    """Mark an error that every rank raises identically (decided by a reduction): rank 0 alone prints it."""
    error.agreed = True
    return error


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    horovod_lines = [line for line in lines if "Horovod" in line or "gloo" in line.lower()]
    return (horovod_lines or lines or [type(exc).__name__])[-1][:300]


def _loss():
    import tensorflow as tf
    return tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _export_model(model, run_dir: Path) -> None:
    """model.keras for users (weights and architecture, no optimizer), written under a temporary name first."""
    import os

    import tensorflow as tf
    tmp = run_dir / f"{checkpoint.TMP_PREFIX}model.keras"
    plain = tf.keras.models.clone_model(model)  # without the distributed optimizer, which only exists under Horovod
    plain.set_weights(model.get_weights())
    plain.save(tmp)
    os.replace(tmp, run_dir / "model.keras")
