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
    stages: int = 1   # pipeline stages P; the ranks are D = size / P replicas of the pipeline

    def __post_init__(self):
        if not (0 <= self.rank < self.size and 0 <= self.local_rank < self.local_size <= self.size
                and 0 <= self.cross_rank < self.cross_size <= self.size and self.stages >= 1
                and self.size % self.stages == 0):
            raise ValueError(f"inconsistent world: {self}")

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    # The pipeline layout: stage = rank % P, replica = rank // P. Neighbouring stages sit on neighbouring ranks, so
    # with P ranks per node a whole pipeline stays on its node (activations over shared memory) and only each stage's
    # gradient all-reduce crosses nodes; Megatron-LM orders its ranks the same way.
    @property
    def stage(self) -> int:
        return self.rank % self.stages

    @property
    def replica(self) -> int:
        return self.rank // self.stages

    @property
    def replicas(self) -> int:
        return self.size // self.stages

    @property
    def first_stage(self) -> bool:
        return self.stage == 0

    @property
    def last_stage(self) -> bool:
        return self.stage == self.stages - 1

    @property
    def previous_rank(self) -> int | None:
        return None if self.first_stage else self.rank - 1

    @property
    def next_rank(self) -> int | None:
        return None if self.last_stage else self.rank + 1

    def stage_ranks(self, stage: int | None = None) -> list[int]:
        """The ranks holding one stage (this rank's by default): the replicas its gradients are averaged over."""
        stage = self.stage if stage is None else stage
        return [replica * self.stages + stage for replica in range(self.replicas)]

    def replica_sets(self) -> list[list[int]]:
        """The ranks holding each part of the model (one part per stage), each list the replicas of that part."""
        return [self.stage_ranks(s) for s in range(self.stages)]

    @property
    def replica_group(self) -> int | None:
        """Which ranks must hold identical weights: None for all of them (data parallelism), else this stage's."""
        return self.stage if self.stages > 1 else None

    def data_view(self) -> "World":
        """The world the data sees: one rank per replica (every stage of a pipeline reads its replica's batches)."""
        if self.stages == 1:
            return self
        return World(rank=self.replica, size=self.replicas, controller=self.controller)

    def describe(self) -> str:
        where = f"{self.size} rank(s) on {self.cross_size} host(s), controller {self.controller}"
        if self.stages == 1:
            return where
        return f"{where}; {self.replicas} replica(s) of a {self.stages}-stage pipeline (this rank: stage {self.stage + 1})"


def start(runtime_cfg=None, *, configure: bool = True, stages: int = 1) -> World:
    """Start this rank: see the module docstring. `configure=False` leaves threads/seeds/precision alone. `stages`:
    pipeline stages, whose process sets Horovod must know from its start."""
    from hvdtrain import backend, runtime
    from hvdtrain.config import RuntimeConfig
    runtime_cfg = runtime_cfg or RuntimeConfig()
    _python_stacks_on_crash()
    runtime.import_tensorflow()
    runtime.stack()
    backend.apply_comm_environment(runtime_cfg)
    world = World(**backend.init(stages))
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
    return World(**backend.topology())   # elastic worlds are never pipelined


def _check_launch(world: World) -> None:
    """srun without an MPI plugin starts N processes that each see a world of one: N silent copies of the job."""
    from hvdtrain import backend
    step_tasks = backend.srun_step_tasks()
    if world.size == 1 and step_tasks > 1:
        raise UserError(f"srun started {step_tasks} tasks but Horovod sees 1 rank in each: launch with "
                        "`srun --mpi=pmix` (or pmi2), as slurm/train.sbatch does", agreed=True)
