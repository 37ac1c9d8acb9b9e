"""The plain-Horovod peer of `hvdtrain bench train`: Horovod as a Keras 3 user must write it today, a custom
training loop over horovod.tensorflow (hvd.DistributedGradientTape fails on Keras 3 with "'Variable' object has no
attribute 'ref'", horovod issue 4290, and horovod.tensorflow.keras does not work with Keras 3).

    horovodrun -np 2 --mpi python -m hvdtrain.bench.horovod_worker --output part.json [--models mlp,cnn ...]

Each rank measures the same models as hvdtrain/bench/train_worker.py, with Horovod's and OpenMPI's defaults (or,
with --hvdtrain-settings, the HOROVOD_*/OMPI_* settings hvdtrain starts its ranks with): rank 0's weights and optimizer state broadcast once, then a tf.function step that averages the gradients
with one hvd.grouped_allreduce (the same loop runs on Keras 2). This is the one benchmark module that calls Horovod's
API directly (through hvdtrain.backend._horovod, the one place that imports it): it is the peer, so it must not go
through hvdtrain.
"""
from __future__ import annotations

import contextlib
import sys

from hvdtrain.bench import harness


class PlainHorovodSession:
    """The session interface of train_worker.measure, on horovod.tensorflow and a custom training loop."""
    parts = False   # no comm-free step or pipeline timing: those are hvdtrain's diagnostics

    def __init__(self, threads: int, runtime_cfg=None):
        import tensorflow as tf

        from hvdtrain.backend import apply_comm_environment
        from hvdtrain.backend._horovod import hvd
        from hvdtrain.world import World
        tf.config.threading.set_intra_op_parallelism_threads(threads)   # before anything starts TensorFlow's runtime
        if runtime_cfg is not None:   # horovod-tuned: hvdtrain's HOROVOD_*/OMPI_* settings, so only the code differs
            apply_comm_environment(runtime_cfg)
        # TensorFlow's own thread behaviour, unless started with hvdtrain's settings
        self.runtime_overrides = {} if runtime_cfg is not None else {"tf_thread_spinning": True}
        self.hvd = h = hvd()
        h.init()
        self.world = World(rank=h.rank(), size=h.size(), local_rank=h.local_rank(), local_size=h.local_size())

    def scope(self):
        return contextlib.nullcontext()

    def distribute(self, optimizer, optim_cfg):
        return optimizer   # the training step all-reduces the gradients itself

    def callbacks(self) -> list:
        return []

    def barrier(self) -> None:
        import tensorflow as tf
        self.hvd.allreduce(tf.constant(0.0), name="horovod_worker.barrier")   # horovod.tensorflow has no barrier

    def fit(self, model, make, *, epochs: int, steps_per_epoch: int, callbacks: list, verbose: int = 0) -> None:
        """What the user writes instead of model.fit: the compiled optimizer and loss, rank 0's state everywhere,
        then steps of averaged gradients; each callback hears of every step's end."""
        self._broadcast_initial_state(model)
        step = self._train_step(model)
        batches = iter(make(self.world))
        for _ in range(epochs):
            for batch in range(steps_per_epoch):
                logs = {"loss": float(step(*next(batches)))}   # float() waits for the step: the timer sees it done
                for callback in callbacks:
                    callback.on_train_batch_end(batch, logs)

    def _broadcast_initial_state(self, model) -> None:
        import tensorflow as tf
        model.optimizer.build(model.trainable_variables)   # its slots must exist to be broadcast
        variables = [*model.variables, *model.optimizer.variables]
        # Horovod assigns inside a tf.function, where a Keras 3 variable arrives as a tensor without `assign`:
        # hand it the tf.Variable behind each one (Keras 2's are tf.Variables already).
        self.hvd.broadcast_variables([v if isinstance(v, tf.Variable) else v.value for v in variables], root_rank=0)

    def _train_step(self, model):
        import tensorflow as tf
        h, optimizer, loss_fn = self.hvd, model.optimizer, model.loss

        @tf.function
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            grads = h.grouped_allreduce(grads, op=h.Average)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))   # Keras 3's apply(), and Keras 2 has it
            return loss
        return step

    def settings(self) -> dict:
        from hvdtrain.backend import active_comm_settings
        return active_comm_settings()   # only what the launch's environment set: Horovod's defaults otherwise


def add_arguments(p) -> None:
    from hvdtrain.bench import train
    p.add_argument("--output", required=True, metavar="FILE.json")
    p.add_argument("--hvdtrain-settings", action="store_true",
                   help="start Horovod and MPI with hvdtrain's communication settings instead of their defaults")
    train.add_workload_arguments(p)


def run(args) -> int:
    from hvdtrain.bench import train_worker
    from hvdtrain.config import load_config
    cfg = load_config(None, args.overrides)
    session = PlainHorovodSession(args.threads, cfg.runtime if args.hvdtrain_settings else None)
    return train_worker.measure(args, cfg, session, "horovod-tuned" if args.hvdtrain_settings else "horovod")


if __name__ == "__main__":
    sys.exit(harness.worker_main(__doc__, add_arguments, run))
