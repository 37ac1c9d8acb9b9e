"""The one module that imports Horovod. Everything else receives a plain `Topology` value.

Horovod is imported lazily so that config, data and model code (and their unit tests) run without MPI.
Communication settings (HOROVOD_* environment) are decided here, before `hvd.init()`:
the environment wins over the config, so a cluster's sbatch script can still override them.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from hvdtrain.errors import UserError


@dataclass(frozen=True)
class Topology:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    cross_rank: int = 0
    cross_size: int = 1
    controller: str = "none"

    @property
    def is_chief(self) -> bool:
        return self.rank == 0


def _hvd():
    """horovod.tensorflow.keras (optimizer wrapper, callbacks, and the collectives it re-exports)."""
    try:
        import horovod.tensorflow.keras as hvd
    except Exception as exc:  # ImportError, or TensorFlow's NotFoundError when horovod/tensorflow/mpi_lib is missing
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"Horovod with TensorFlow support is not importable ({first}); rebuild it against this "
                        "TensorFlow: scripts/install.sh --rebuild-horovod") from None
    return hvd


def _hvd_tf():
    _hvd()
    import horovod.tensorflow as hvd_tf
    return hvd_tf


def rank_hint() -> int:
    """This process's rank from the launcher's environment, without starting Horovod (for error printing)."""
    for key in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def under_launcher() -> bool:
    """Started by horovodrun, mpirun or srun (their output is line-tagged or collected, not a live terminal)."""
    return any(k in os.environ for k in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_STEP_ID"))


def agree_on_errors(fn, name: str):
    """Run fn on every rank; if any rank raised a UserError, every rank raises it (all stop together)."""
    try:
        result, message = fn(), ""
    except UserError as exc:
        result, message = None, str(exc)
    messages = allgather_object(message, name=name)
    failed = [(r, m) for r, m in enumerate(messages) if m]
    if failed:
        rank, first = failed[0]
        error = UserError(first if len(messages) == 1 else f"{first} (on rank {rank})")
        error.agreed = True
        raise error
    return result


def comm_environment(runtime) -> dict[str, str]:
    """HOROVOD_* settings from the config; values already in the environment are kept (they win)."""
    wanted = {
        "HOROVOD_CYCLE_TIME": f"{runtime.cycle_time_ms:g}",
        "HOROVOD_FUSION_THRESHOLD": str(int(runtime.fusion_threshold_mb * 1024 * 1024)),
        # A collective that not every rank joins is reported at half the timeout; Horovod's own shutdown is a
        # backstop behind hvdtrain's per-rank watchdog (callbacks.Watchdog), which fires at the timeout.
        "HOROVOD_STALL_CHECK_TIME_SECONDS": f"{max(1, int(runtime.stall_timeout_s // 2))}",
        "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": f"{int(2 * runtime.stall_timeout_s)}",
    }
    if launched_elastic():
        # Horovod 0.28.1 segfaults in hvd.init() on an elastic reset whenever HOROVOD_CYCLE_TIME and
        # HOROVOD_FUSION_THRESHOLD are both set (reproduced with plain Horovod; either alone is fine).
        del wanted["HOROVOD_FUSION_THRESHOLD"]
    if runtime.cpu_operations != "auto":
        wanted["HOROVOD_CPU_OPERATIONS"] = runtime.cpu_operations.upper()
    elif launched_by_mpi():
        wanted["HOROVOD_CPU_OPERATIONS"] = "MPI"  # MPI's shared-memory transport beats Gloo's TCP on one host
    if runtime.mpi_yield_when_idle:
        # Read by OpenMPI at MPI_Init, so setting it here (before hvd.init) is enough. Without it every MPI wait
        # spins a core: 2 ranks on 2 cores trained the 6M-parameter MLP ~3.5x slower (docs/benchmarks.md).
        wanted["OMPI_MCA_mpi_yield_when_idle"] = "1"
    return {key: os.environ.get(key, value) for key, value in wanted.items()}


def apply_comm_environment(runtime) -> None:
    """Put the communication settings into this process's environment; call before MPI or Horovod start."""
    os.environ.update(comm_environment(runtime))


def launched_by_mpi() -> bool:
    """Started by mpirun/srun (horovodrun --mpi uses mpirun), so MPI_Init can join the other ranks."""
    return "OMPI_COMM_WORLD_RANK" in os.environ or "PMIX_RANK" in os.environ or "PMI_RANK" in os.environ


# Horovod variables that change performance (the launcher's own HOROVOD_RANK, HOROVOD_GLOO_* etc. are not settings).
TUNING_KEYS = ("HOROVOD_CYCLE_TIME", "HOROVOD_FUSION_THRESHOLD", "HOROVOD_CPU_OPERATIONS", "HOROVOD_CACHE_CAPACITY",
               "HOROVOD_AUTOTUNE", "HOROVOD_HIERARCHICAL_ALLREDUCE", "HOROVOD_TIMELINE", "OMPI_MCA_mpi_yield_when_idle")


def active_comm_settings() -> dict[str, str]:
    """The performance-relevant HOROVOD_* values in force in this process (for benchmark reports)."""
    return {key: os.environ[key] for key in TUNING_KEYS if key in os.environ}


def init(runtime=None) -> Topology:
    """Apply communication settings, start Horovod, pin this rank's GPU, and return the topology."""
    if runtime is not None:
        apply_comm_environment(runtime)
    _check_tensorflow_support()
    _hvd().init()
    topo = current_topology()
    pin_device(topo)
    return topo


def current_topology() -> Topology:
    """The world as Horovod sees it now (it changes after an elastic reset)."""
    hvd = _hvd()
    return Topology(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(),
                    hvd.cross_rank(), hvd.cross_size(), "mpi" if hvd.mpi_enabled() else "gloo")


def launched_elastic() -> bool:
    return os.environ.get("HOROVOD_ELASTIC") == "1"


def elastic_state(variables_fn, **counters):
    """Horovod Elastic state: the given variables plus progress counters (e.g. epoch=0), committed and synced.

    Horovod's own Keras state calls `optimizer.variables()`, which is a list property on Keras 2.11+ optimizers,
    and its TensorFlowState does not re-broadcast variables in eager mode; this one does both correctly.
    """
    from horovod.common.elastic import ObjectState
    hvd_tf = _hvd_tf()

    class VariablesState(ObjectState):
        def __init__(self):
            super().__init__(bcast_object=hvd_tf.broadcast_object, get_rank=hvd_tf.rank, **counters)
            self._save_variables()

        def _save_variables(self):
            self._saved = [v.numpy() for v in variables_fn()]

        def save(self):
            self._save_variables()
            super().save()

        def restore(self):
            for variable, value in zip(variables_fn(), self._saved):
                variable.assign(value)
            super().restore()

        def sync(self):  # a joining worker receives rank 0's variables and counters here
            hvd_tf.broadcast_variables(variables_fn(), root_rank=0)
            self._save_variables()
            super().sync()

    return VariablesState()


def elastic_run(fn):
    """hvd.elastic.run: re-run fn(state) after each membership change, from the last committed state."""
    return _hvd().elastic.run(fn)


def _check_tensorflow_support() -> None:
    hvd_tf = _hvd_tf()  # raises a UserError when the TensorFlow extension is missing
    try:
        hvd_tf.mpi_built()
    except Exception as exc:  # the extension loads but was built against another TensorFlow
        raise UserError(f"Horovod was built without working TensorFlow support ({exc}); "
                        "rebuild it after installing TensorFlow: scripts/install.sh --rebuild-horovod") from None


def pin_device(topo: Topology) -> None:
    """One GPU per rank: the GPU of this local rank, or the only visible one when the launcher already bound
    one GPU per task (srun --gpus-per-task, CUDA_VISIBLE_DEVICES per rank). CPU-only machines are left alone."""
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return
    if len(gpus) > 1 and topo.local_size > len(gpus):
        raise UserError(f"{topo.local_size} ranks on this node but only {len(gpus)} GPUs visible; launch one rank per GPU")
    gpu = gpus[0] if len(gpus) == 1 else gpus[topo.local_rank]
    tf.config.experimental.set_memory_growth(gpu, True)
    tf.config.set_visible_devices(gpu, "GPU")


def wrap_optimizer(optimizer, optim_cfg):
    hvd = _hvd()
    compression = hvd.Compression.fp16 if optim_cfg.fp16_compression else hvd.Compression.none
    return hvd.DistributedOptimizer(optimizer, compression=compression,
                                    backward_passes_per_step=optim_cfg.backward_passes_per_step,
                                    average_aggregated_gradients=True,
                                    sparse_as_dense=optim_cfg.sparse_as_dense)


def broadcast_callback():
    """Makes every replica start from rank 0's weights and optimizer state."""
    return _hvd().callbacks.BroadcastGlobalVariablesCallback(0)


def metric_average_callback():
    """Averages epoch metrics over ranks (Horovod sorts the keys so every rank reduces in the same order)."""
    return _hvd().callbacks.MetricAverageCallback()


def broadcast_variables(variables) -> None:
    _hvd_tf().broadcast_variables(variables, root_rank=0)


def allreduce_sum(values, name: str) -> np.ndarray:
    """Sum a float64 vector over all ranks (exact counts and sums for evaluation)."""
    import tensorflow as tf
    hvd = _hvd_tf()
    return hvd.allreduce(tf.constant(np.asarray(values, dtype=np.float64)), op=hvd.Sum, name=name).numpy()


def allreduce_loop(name: str, op: str = "sum"):
    """A tf.function (x, iters) -> the all-reduce of x over ranks, run `iters` times back to back in one graph.

    Each collective waits for the previous one (a control dependency), so the loop measures Horovod's own
    latency and bandwidth with no Python between collectives, the way a training step issues them.
    """
    import tensorflow as tf
    hvd = _hvd_tf()
    reduce_op = {"sum": hvd.Sum, "average": hvd.Average}[op]

    @tf.function
    def loop(x, iters):
        def body(i, previous):
            with tf.control_dependencies([previous]):
                return i + 1, hvd.allreduce(x, op=reduce_op, name=name)
        return tf.while_loop(lambda i, _: i < iters, body, (tf.constant(0), tf.zeros_like(x)),
                             parallel_iterations=1)[1]
    return loop


def allreduce_eager(x, name: str):
    """One eager (not tf.function) sum all-reduce: the slow path, measured by the benchmark for comparison."""
    hvd = _hvd_tf()
    return hvd.allreduce(x, op=hvd.Sum, name=name)


def allreduce_min(values, name: str) -> np.ndarray:
    import tensorflow as tf
    hvd = _hvd_tf()
    return hvd.allreduce(tf.constant(np.asarray(values, dtype=np.int64)), op=hvd.Min, name=name).numpy()


def all_agree(flag: bool, name: str) -> bool:
    """True only if every rank says True (a MIN-reduce); all ranks get the same answer."""
    return bool(allreduce_min([1 if flag else 0], name)[0])


def any_rank(flag: bool, name: str) -> bool:
    return not all_agree(not flag, name)


def allgather_object(obj, name: str) -> list:
    return _hvd_tf().allgather_object(obj, name=name)


def broadcast_object(obj, name: str):
    return _hvd_tf().broadcast_object(obj, root_rank=0, name=name)


def barrier() -> None:
    allreduce_sum([0.0], name="hvdtrain.barrier")


class CollectiveFailure(UserError):
    """A collective failed because a peer died, stalled or lost its network."""
    exit_code = 4


def is_collective_failure(exc: BaseException) -> bool:
    text = str(exc)
    return any(mark in text for mark in ("Horovod", "gloo", "Gloo", "HorovodAllreduce", "HorovodBroadcast"))


def weights_digest(model) -> str:
    """A hash of every weight's bytes: equal digests mean bit-identical replicas."""
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


def build_info() -> dict:
    """What Horovod was built with and how it is configured, for `hvdtrain doctor`."""
    import horovod
    import horovod.tensorflow as hvd_tf
    return {
        "horovod": horovod.__version__,
        "controllers": {"mpi": hvd_tf.mpi_built(), "gloo": hvd_tf.gloo_built()},
        "tensor_operations": {"nccl": hvd_tf.nccl_built(), "mpi": hvd_tf.mpi_built(), "gloo": hvd_tf.gloo_built(),
                              "ddl": hvd_tf.ddl_built(), "ccl": hvd_tf.ccl_built()},
    }
