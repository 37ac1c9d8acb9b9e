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
    stages: int = 1   # pipeline stages P
    tensor: int = 1   # tensor-parallel degree T; the ranks are D = size / (P * T) replicas of the model

    def __post_init__(self):
        if not (0 <= self.rank < self.size and 0 <= self.local_rank < self.local_size <= self.size
                and 0 <= self.cross_rank < self.cross_size <= self.size and self.stages >= 1 and self.tensor >= 1
                and self.size % (self.stages * self.tensor) == 0):
            raise ValueError(f"inconsistent world: {self}")

    @classmethod
    def layout(cls, size: int, stages: int = 1, tensor: int = 1) -> "World":
        """Rank 0 of a world of this shape (for its groups, before Horovod starts)."""
        return cls(size=size, local_size=size, stages=stages, tensor=tensor)

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    # The layout, Megatron-LM's order: t = rank % T, stage = (rank // T) % P, replica = rank // (P * T). A tensor group
    # (the T ranks that split each split layer, an all-reduce in every block) is consecutive ranks, so with T ranks
    # per node it stays on its node, where the links are fast; then a pipeline's stages, neighbouring tensor groups
    # (activations over shared memory with P * T ranks per node); only each part's gradient all-reduce over its D
    # replicas crosses nodes.
    @property
    def tensor_rank(self) -> int:
        return self.rank % self.tensor

    @property
    def stage(self) -> int:
        return (self.rank // self.tensor) % self.stages

    @property
    def replica(self) -> int:
        return self.rank // (self.stages * self.tensor)

    @property
    def replicas(self) -> int:
        return self.size // (self.stages * self.tensor)

    @property
    def first_stage(self) -> bool:
        return self.stage == 0

    @property
    def last_stage(self) -> bool:
        return self.stage == self.stages - 1

    def rank_of(self, replica: int, stage: int = 0, tensor_rank: int = 0) -> int:
        return (replica * self.stages + stage) * self.tensor + tensor_rank

    @property
    def previous_rank(self) -> int | None:
        """The previous stage's rank of this rank's pipeline (the same tensor rank)."""
        return None if self.first_stage else self.rank - self.tensor

    @property
    def next_rank(self) -> int | None:
        return None if self.last_stage else self.rank + self.tensor

    def part_ranks(self, stage: int | None = None, tensor_rank: int | None = None) -> list[int]:
        """The ranks holding one part of the model, a stage's tensor slice (this rank's by default): the replicas its
        gradients are averaged over."""
        stage = self.stage if stage is None else stage
        tensor_rank = self.tensor_rank if tensor_rank is None else tensor_rank
        return [self.rank_of(replica, stage, tensor_rank) for replica in range(self.replicas)]

    def replica_sets(self) -> list[list[int]]:
        """The ranks holding each part of the model (one part per stage and tensor slice), each list the replicas of
        that part."""
        return [self.part_ranks(s, t) for s in range(self.stages) for t in range(self.tensor)]

    @property
    def replica_group(self) -> tuple | None:
        """Which ranks must hold identical weights: None for all of them (data parallelism), else this part's."""
        return tuple(self.part_ranks()) if self.stages * self.tensor > 1 else None

    @property
    def tensor_group(self) -> tuple | None:
        """The ranks that split this rank's split layers with it (None without tensor parallelism)."""
        first = self.rank - self.tensor_rank
        return tuple(range(first, first + self.tensor)) if self.tensor > 1 else None

    def tensor_groups(self) -> list[list[int]]:
        return [list(range(first, first + self.tensor)) for first in range(0, self.size, self.tensor)]

    def process_groups(self) -> list[list[int]]:
        """The groups Horovod must know from its start (process sets): every part's replicas and every tensor group,
        each with more than one rank and fewer than all."""
        groups = self.replica_sets() if self.stages * self.tensor > 1 else []
        groups += self.tensor_groups() if self.tensor > 1 else []
        return [g for g in groups if 1 < len(g) < self.size]

    def reporters(self) -> list[int]:
        """One rank per replica whose results stand for it, in replica order: its last stage's first tensor rank (every
        rank of a tensor group computes the same outputs)."""
        return [self.rank_of(replica, self.stages - 1, 0) for replica in range(self.replicas)]

    def data_view(self) -> "World":
        """The world the data sees: one rank per replica (every stage and tensor slice reads its replica's batches)."""
        if self.stages * self.tensor == 1:
            return self
        return World(rank=self.replica, size=self.replicas, controller=self.controller)

    def describe(self) -> str:
        where = f"{self.size} rank(s) on {self.cross_size} host(s), controller {self.controller}"
        if self.stages * self.tensor == 1:
            return where
        parts = ([f"a {self.stages}-stage pipeline"] if self.stages > 1 else []) + \
            ([f"{self.tensor}-way tensor-parallel layers"] if self.tensor > 1 else [])
        this = ([f"stage {self.stage + 1}"] if self.stages > 1 else []) + \
            ([f"tensor slice {self.tensor_rank + 1}"] if self.tensor > 1 else [])
        return f"{where}; {self.replicas} replica(s) of {' with '.join(parts)} (this rank: {', '.join(this)})"


def start(runtime_cfg=None, *, configure: bool = True, stages: int = 1, tensor: int = 1) -> World:
    """Start this rank: see the module docstring. `configure=False` leaves threads/seeds/precision alone. `stages`,
    `tensor`: pipeline stages and tensor-parallel degree, whose process sets Horovod must know from its start."""
    from hvdtrain import backend, runtime
    from hvdtrain.config import RuntimeConfig
    runtime_cfg = runtime_cfg or RuntimeConfig()
    _python_stacks_on_crash()
    runtime.import_tensorflow()
    runtime.stack()
    backend.apply_comm_environment(runtime_cfg)
    groups = (lambda size: World.layout(size, stages, tensor).process_groups())   # numbered here only
    world = World(**backend.init(stages, tensor, groups))
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
    return World(**backend.topology())   # elastic worlds are never pipelined nor tensor-parallel


def _check_launch(world: World) -> None:
    """srun without an MPI plugin starts N processes that each see a world of one: N silent copies of the job."""
    from hvdtrain import backend
    step_tasks = backend.srun_step_tasks()
    if world.size == 1 and step_tasks > 1:
        raise UserError(f"srun started {step_tasks} tasks but Horovod sees 1 rank in each: launch with "
                        "`srun --mpi=pmix` (or pmi2), as slurm/train.sbatch does", agreed=True)
