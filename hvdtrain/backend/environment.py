"""Every environment variable hvdtrain reads about launchers and communication, in one place (no Horovod import).

Launchers announce a rank through different variables; the one table below says which launcher sets which, so
`rank_hint`, `under_launcher` and `launched_by_mpi` cannot drift apart. The HOROVOD_*/OMPI_* settings hvdtrain
derives from the config are decided here too, before `hvd.init()`: a value already in the environment (e.g. from a
cluster's job script) wins over the config.
"""
from __future__ import annotations

import os

# variable -> (launcher, carries this process's global rank, means MPI_Init can join the other ranks)
LAUNCHER_VARIABLES = {
    "HOROVOD_RANK": ("horovodrun", True, False),          # horovodrun --gloo (and the elastic driver)
    "OMPI_COMM_WORLD_RANK": ("mpirun", True, True),       # OpenMPI's mpirun, also under horovodrun --mpi
    "PMIX_RANK": ("srun --mpi=pmix", True, True),
    "PMI_RANK": ("srun --mpi=pmi2 / MPICH", True, True),
    "SLURM_PROCID": ("srun", True, False),                # srun without an MPI plugin: a rank, but no MPI wire-up
}


def _present() -> list[str]:
    return [name for name in LAUNCHER_VARIABLES if os.environ.get(name, "").isdigit()]


def rank_hint() -> int:
    """This process's rank from the launcher's environment, without starting Horovod (to print errors once)."""
    for name in _present():
        return int(os.environ[name])
    return 0


def under_launcher() -> bool:
    """Started as one rank of several by horovodrun, mpirun or srun (output is prefixed/collected, not a terminal)."""
    return bool(_present())


def launcher_name() -> str:
    present = _present()
    return LAUNCHER_VARIABLES[present[0]][0] if present else "none"


def launched_by_mpi() -> bool:
    """Started by mpirun/srun with an MPI plugin, so MPI_Init can join the other ranks."""
    return any(LAUNCHER_VARIABLES[name][2] for name in _present())


def launch_controller() -> str:
    """HVDTRAIN_CONTROLLER: how hvdtrain's own launches start ranks, mpi (default) or gloo."""
    return os.environ.get("HVDTRAIN_CONTROLLER", "mpi")


def tensorflow_banners_hidden() -> bool:
    """TensorFlow's start-up banners are hidden unless TF_CPP_MIN_LOG_LEVEL=0 asks for them (2 by default)."""
    return os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2") != "0"


def legacy_keras_requested() -> bool:
    """TF_USE_LEGACY_KERAS=1 selects tf-keras (Keras 2) on TensorFlow >= 2.16."""
    return os.environ.get("TF_USE_LEGACY_KERAS") in ("1", "true", "True")


def launched_elastic() -> bool:
    return os.environ.get("HOROVOD_ELASTIC") == "1"


def local_size_hint() -> int:
    """Ranks on this node from the launcher's environment, without starting Horovod (1 when not announced)."""
    for name in ("OMPI_COMM_WORLD_LOCAL_SIZE", "HOROVOD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def size_hint() -> int:
    """Ranks in the job from a Gloo launcher's environment (horovodrun --gloo), before Horovod starts (1 alone)."""
    value = os.environ.get("HOROVOD_SIZE", "")
    return int(value) if value.isdigit() else 1


def srun_step_tasks() -> int:
    """How many tasks srun started for this step (0 outside srun)."""
    value = os.environ.get("SLURM_STEP_NUM_TASKS", "")
    return int(value) if value.isdigit() else 0


def comm_environment(runtime) -> dict[str, str]:
    """HOROVOD_*/OMPI_* settings from the runtime config; values already in the environment are kept (they win)."""
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
    if runtime.wake_on_enqueue:   # read by hvdtrain's Horovod build (scripts/patches); others ignore both
        wanted.update(HOROVOD_WAKE_ON_ENQUEUE="1", HOROVOD_IDLE_CYCLE_TIME=f"{runtime.idle_cycle_time_ms:g}")
    if runtime.mpi_yield_when_idle:
        # Read by OpenMPI at MPI_Init, so setting it before hvd.init is enough. Without it every MPI wait spins a
        # core: 2 ranks on 2 cores trained the 6M-parameter MLP ~3.5x slower (docs/benchmarks.md).
        wanted["OMPI_MCA_mpi_yield_when_idle"] = "1"
    return {key: os.environ.get(key, value) for key, value in wanted.items()}


def apply_comm_environment(runtime) -> None:
    """Put the communication settings into this process's environment; call before MPI or Horovod start."""
    os.environ.update(comm_environment(runtime))


# Horovod variables that change performance (the launcher's own HOROVOD_RANK, HOROVOD_GLOO_* etc. are not settings).
TUNING_KEYS = ("HOROVOD_CYCLE_TIME", "HOROVOD_FUSION_THRESHOLD", "HOROVOD_CPU_OPERATIONS", "HOROVOD_CACHE_CAPACITY",
               "HOROVOD_AUTOTUNE", "HOROVOD_HIERARCHICAL_ALLREDUCE", "HOROVOD_TIMELINE", "HOROVOD_WAKE_ON_ENQUEUE",
               "HOROVOD_IDLE_CYCLE_TIME", "OMPI_MCA_mpi_yield_when_idle")


def active_comm_settings() -> dict[str, str]:
    """The performance-relevant HOROVOD_* values in force in this process (for benchmark reports)."""
    return {key: os.environ[key] for key in TUNING_KEYS if key in os.environ}
