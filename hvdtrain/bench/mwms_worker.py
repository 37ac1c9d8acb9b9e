"""The comparison peer of `hvdtrain bench train`: TensorFlow's own tf.distribute.MultiWorkerMirroredStrategy
(collective all-reduce over gRPC), N workers on localhost told about each other through TF_CONFIG.

    python -m hvdtrain.bench.mwms_worker --output part.json [--models mlp,cnn ...]   (one per worker, TF_CONFIG set)
    python -m hvdtrain.bench.mwms_worker --stock-fit-only --output stock.json        (the same; Keras 3 only)

`launch` starts the workers (driver side); each worker then measures the same models as hvdtrain/bench/train_worker.py,
with the strategy's scope and a dataset per input pipeline. Keras 3's own model.fit fails under this strategy, so
the measured fit works around it (see _around_keras3_failures); --stock-fit-only records how stock model.fit fails.
Nothing else in hvdtrain uses tf.distribute.
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys

from hvdtrain.bench import harness


def launch(np_: int, worker_args: list, timeout: float = harness.TIMEOUT) -> None:
    """np_ workers on localhost with their TF_CONFIG; fails (and stops the others) if one fails, or raises
    subprocess.TimeoutExpired if one is still running after `timeout` seconds."""
    workers = [f"localhost:{_free_port()}" for _ in range(np_)]
    cmd, procs = harness.worker_cmd("mwms_worker", *worker_args), []
    try:
        for index in range(np_):
            config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
            procs.append(subprocess.Popen(cmd, env=harness.rank_env({"TF_CONFIG": json.dumps(config)}),
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            harness.check(subprocess.CompletedProcess(cmd, proc.returncode, out, ""), cmd)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class MwmsSession:
    """The session interface of train_worker.measure, on MultiWorkerMirroredStrategy."""
    parts = False   # no comm-free step or pipeline timing: those are hvdtrain's diagnostics
    runtime_overrides = {"tf_thread_spinning": True}   # TensorFlow's own thread behaviour

    def __init__(self, threads: int, keras3_workarounds: bool = True):
        import tensorflow as tf

        from hvdtrain.world import World
        tf.config.threading.set_intra_op_parallelism_threads(threads)   # before the strategy starts the runtime
        self.strategy = tf.distribute.MultiWorkerMirroredStrategy()
        self.world = World(rank=self.strategy.cluster_resolver.task_id, size=self.strategy.num_replicas_in_sync)
        self.keras3_workarounds = keras3_workarounds

    def scope(self):
        return self.strategy.scope()

    def distribute(self, optimizer, optim_cfg):
        return optimizer   # the strategy all-reduces gradients itself

    def callbacks(self) -> list:
        return []

    def barrier(self) -> None:
        pass

    def fit(self, model, make, **kwargs):
        """Each worker builds its own shard, batched per replica (Keras 2 and Keras 3 both take this)."""
        from hvdtrain.world import World
        dataset = self.strategy.distribute_datasets_from_function(
            lambda ctx: make(World(rank=ctx.input_pipeline_id, size=ctx.num_input_pipelines)))
        with self.strategy.scope():
            if self.keras3_workarounds and hasattr(model, "_distribute_strategy"):
                _around_keras3_failures(model)
            model.fit(dataset, **kwargs)

    def settings(self) -> dict:
        return {}


def _around_keras3_failures(model) -> None:
    """Keras 3 does not support this strategy (keras issue 20585): its fit fails twice, and both failures are
    worked around here, for this benchmark only. (1) Before the first step it averages the first (x, y) batch over
    replicas to build variables early, which the strategy cannot do for a nested batch ("Attempt to convert a
    value (PerReplica...)"): build the optimizer here and tell Keras it has no strategy of its own; fit then runs
    inside the strategy's scope, where Keras picks the strategy up again. (2) After every step it averages the
    logged scalars over axis 0, which scalars do not have ("Invalid reduction dimension 0", tensorflow issue
    72388): log them as 1-element vectors. The gradients are still all-reduced by the strategy inside the
    optimizer, as on Keras 2."""
    import tensorflow as tf
    model.optimizer.build(model.trainable_variables)
    model._distribute_strategy = None
    step = model.train_step
    model.train_step = lambda data: {k: tf.reshape(v, [1]) for k, v in step(data).items()}


def add_arguments(p) -> None:
    from hvdtrain.bench import train
    p.add_argument("--output", required=True, metavar="FILE.json")
    p.add_argument("--stock-fit-only", action="store_true",
                   help="measure nothing: run Keras's own model.fit on mlp for 2 steps without the Keras 3 "
                        'workarounds; worker 0 writes {"stock_fit": "works" or "fails: <error>"}')
    train.add_workload_arguments(p)


def run(args) -> int:
    from hvdtrain.bench import train_worker
    from hvdtrain.config import load_config
    cfg = load_config(None, args.overrides)
    if args.stock_fit_only:
        return _try_stock_fit(args, cfg)
    return train_worker.measure(args, cfg, MwmsSession(args.threads), "mwms")


def _try_stock_fit(args, cfg) -> int:
    """Stock model.fit on the model measure() builds, for 2 steps: the outcome a Keras 3 user of the strategy gets."""
    from hvdtrain.bench import train_worker
    session = MwmsSession(args.threads, keras3_workarounds=False)
    two_steps = argparse.Namespace(**{**vars(args), "models": "mlp", "warmup": 1, "steps": 1})
    try:
        train_worker.measure(two_steps, cfg, session, "mwms")
        outcome = "works"
    except Exception as exc:   # any failure is the finding, not an error of this benchmark
        outcome = f"fails: {type(exc).__name__}: {_short_message(exc)}"
    if session.world.rank == 0:
        harness.write_json(args.output, {"stock_fit": outcome})   # replaces the rows measure() wrote if fit worked
    return 0


def _short_message(exc: Exception, limit: int = 160) -> str:
    """The message on one line; TensorFlow puts whole tensors in the middle of some (a PerReplica's values)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


if __name__ == "__main__":
    sys.exit(harness.worker_main(__doc__, add_arguments, run))
