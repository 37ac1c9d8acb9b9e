"""The world a rank lives in, and the one way to start it.

`World` is a plain, validated value (rank, size, where the ranks are): data, models, callbacks and tests take it
and never ask Horovod. `start()` is the single startup path of the trainer, predict/evaluate, the Keras API, doctor
and the benchmarks: Python's crash handler installed, TensorFlow imported quietly, the stack checked,
communication settings applied, Horovod started, the launch checked, this rank's GPU pinned, then threads, seeds
and precision.
"""
from __future__ import annotations

import faulthandler
import io
import sys
from dataclasses import dataclass

from hvdtrain.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    cross_rank: int = 0
    cross_size: int = 1
    controller: str = "none"

    def __post_init__(self):
        if not (0 <= self.rank < self.size and 0 <= self.local_rank < self.local_size <= self.size
                and 0 <= self.cross_rank < self.cross_size <= self.size):
            raise ValueError(f"inconsistent world: {self}")

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"{self.size} rank(s) on {self.cross_size} host(s), controller {self.controller}"


def start(runtime_cfg=None, *, configure: bool = True) -> World:
    """Start this rank: see the module docstring. `configure=False` leaves threads/seeds/precision alone."""
    from hvdtrain import backend, runtime
    from hvdtrain.config import RuntimeConfig
    runtime_cfg = runtime_cfg or RuntimeConfig()
    _python_stacks_on_crash()
    runtime.import_tensorflow()
    runtime.stack()
    backend.apply_comm_environment(runtime_cfg)
    world = World(**backend.init())
    _check_launch(world)
    runtime.pin_device(world.local_rank, world.local_size)
    if configure:
        runtime.configure(runtime_cfg, world.local_size)
    return world


def _python_stacks_on_crash() -> None:
    """A native crash (TensorFlow, Horovod, MPI, PMIx) prints every thread's Python stack to stderr. Installed before
    MPI_Init on purpose: Open MPI keeps a handler already there, and its own trace names no Python frame."""
    try:
        faulthandler.enable(file=sys.__stderr__ or sys.stderr, all_threads=True)
    except (AttributeError, ValueError, io.UnsupportedOperation):
        pass   # no stderr with a file descriptor (an embedding host): nothing to print to


def current() -> World:
    """The world now (it changes after an elastic reset)."""
    from hvdtrain import backend
    return World(**backend.topology())


def _check_launch(world: World) -> None:
    """srun without an MPI plugin starts N processes that each see a world of one: N silent copies of the job."""
    from hvdtrain import backend
    step_tasks = backend.srun_step_tasks()
    if world.size == 1 and step_tasks > 1:
        raise UserError(f"srun started {step_tasks} tasks but Horovod sees 1 rank in each: launch with "
                        "`srun --mpi=pmix` (or pmi2), as slurm/train.sbatch does", agreed=True)
