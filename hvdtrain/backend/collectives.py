"""Starting Horovod and the collectives hvdtrain uses, framework-neutral (the same on Keras 2 and Keras 3).

Every function here is a collective unless it says otherwise: all ranks must call it, in the same order.
"""
from __future__ import annotations

import numpy as np

from hvdtrain.backend import traffic
from hvdtrain.backend._horovod import hvd
from hvdtrain.errors import UserError

_group_sets: dict = {}   # Horovod process sets by their ranks: the layout's groups (a pipeline stage's or a tensor
                        # slice's replicas, tensor groups); a group of one rank or of all has none


def init(stages: int = 1, tensor: int = 1, groups=None) -> dict:
    """Start Horovod (MPI or Gloo, as launched) and return the topology (see `topology`). Not a collective.
    With pipeline stages or tensor-parallel layers, the layout's groups (`groups(size)`: lists of ranks, the same
    on every rank) become Horovod process sets, fixed at its start; activations between stages travel by MPI
    point-to-point, so a pipeline's launch must be MPI's."""
    if stages == 1 and tensor == 1:
        hvd().init()
        return topology()
    from hvdtrain.backend.environment import launched_by_mpi, size_hint, under_launcher
    from hvdtrain.config import check_layout
    if not under_launcher():
        check_layout(stages, tensor, 1)   # one process, no launcher: too few ranks is what is wrong, whatever the launcher
    if stages > 1 and not launched_by_mpi():
        raise UserError(f"parallel.pipeline_stages={stages} sends activations between stages with MPI point-to-point "
                        "messages: launch with MPI (scripts/launch.sh or horovodrun --mpi, mpirun, srun --mpi=pmix), "
                        "not Gloo", agreed=True)
    if launched_by_mpi():
        from hvdtrain.backend._mpi import mpi
        size = mpi().COMM_WORLD.Get_size()   # known before Horovod starts: the process sets are fixed at its start
    else:
        size = size_hint()
    check_layout(stages, tensor, size)
    wanted = [tuple(g) for g in groups(size)]
    h = hvd()
    if h.is_initialized():   # a second command in the same process (a test worker, a notebook)
        if any(g not in _group_sets for g in wanted):
            raise UserError(f"Horovod was started in this process without the process sets of this layout "
                            f"(parallel.pipeline_stages={stages}, parallel.tensor_parallel={tensor}); run it in a "
                            "new process", agreed=True)
    else:
        _group_sets.clear()
        _group_sets.update({g: h.ProcessSet(list(g)) for g in dict.fromkeys(wanted)})
        h.init(process_sets=list(_group_sets.values()))
    return {**topology(), "stages": stages, "tensor": tensor}


def _process_set(group):
    """The Horovod process set of a group of ranks (a tuple), or the global set for None (or all ranks); None for a
    group of one rank (nothing to communicate: callers check `_group_size` first)."""
    if group is None or len(group) == hvd().size():
        return hvd().global_process_set
    return _group_sets[tuple(group)] if len(group) > 1 else None


def _group_root(group) -> int:
    """The group's first rank (global numbering, as Horovod's broadcast wants it even within a process set)."""
    return 0 if group is None else group[0]


def _group_size(group) -> int:
    return hvd().size() if group is None else len(group)


def topology() -> dict:
    """rank, size, local/cross rank and size, controller: the world as Horovod sees it now (an elastic reset
    changes it). Not a collective."""
    h = hvd()
    return {"rank": h.rank(), "size": h.size(), "local_rank": h.local_rank(), "local_size": h.local_size(),
            "cross_rank": h.cross_rank(), "cross_size": h.cross_size(),
            "controller": "mpi" if h.mpi_enabled() else "gloo"}


def allreduce(tensor, op: str = "sum", name: str | None = None):
    """A TensorFlow all-reduce of one tensor; usable inside tf.function (the benchmarks build loops of it)."""
    h = hvd()
    reduce_op = {"sum": h.Sum, "average": h.Average, "min": h.Min, "max": h.Max}[op]
    return h.allreduce(tensor, op=reduce_op, name=name)


# The collectives below take and return Python/NumPy values, and on one rank return at once: callers never ask how
# many ranks there are. (Inside traced functions, which outlive an elastic resize, the Keras layers decide.)

def _alone() -> bool:
    return size() == 1


def allreduce_sum(values, name: str, kind: str = "control") -> np.ndarray:
    """Sum a float64 vector over all ranks (exact counts and sums for evaluation and agreement; `kind`: what the
    bytes count as, see traffic.py)."""
    values = np.asarray(values, dtype=np.float64)
    if _alone():
        return values
    import tensorflow as tf
    traffic.count_arrays(kind, [values])
    return allreduce(tf.constant(values), "sum", name).numpy()


def allreduce_min(values, name: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.int64)
    if _alone():
        return values
    import tensorflow as tf
    traffic.count_arrays("control", [values])
    return allreduce(tf.constant(values), "min", name).numpy()


def all_agree(flag: bool, name: str) -> bool:
    """True only if every rank says True (a MIN-reduce); all ranks get the same answer."""
    return bool(allreduce_min([1 if flag else 0], name)[0])


def allgather_object(obj, name: str, group=None) -> list:
    """Every rank's (small, picklable) object, in rank order; with `group` (a tuple of ranks), the group's ranks'
    (a collective of the group)."""
    if _group_size(group) == 1:
        return [obj]
    if group is None:
        return hvd().allgather_object(obj, name=name)
    return hvd().allgather_object(obj, name=name, process_set=_process_set(group))


def broadcast_object(obj, name: str):
    """Rank 0's object, on every rank."""
    return obj if _alone() else hvd().broadcast_object(obj, root_rank=0, name=name)


def barrier() -> None:
    allreduce_sum([0.0], name="hvdtrain.barrier")


def join() -> None:
    """Horovod's join: this rank stops contributing; other ranks' all-reduces go on with zeros from it until every
    rank has joined. Used when one rank hit a data error mid-step (see callbacks.StopAgreement)."""
    hvd().join()


def size() -> int:
    """Ranks right now (not a collective)."""
    return hvd().size()


def agree_on_errors(fn, name: str):
    """Run fn on every rank; if any rank raised a UserError, every rank raises it (all stop together, rank 0 prints).

    The first failing rank's message is used, with its rank appended when there are several ranks, and the same
    error type (a DataError stays a DataError, so its exit code is kept).
    """
    try:
        result, failure = fn(), None
    except UserError as exc:
        result, failure = None, exc
    failures = allgather_object(failure, name=name)
    raise_first(failures)
    return result


def raise_first(failures: list) -> None:
    """Raise the first rank's UserError (gathered from every rank; None means success) as an agreed error of the same
    type, so its exit code is kept."""
    failed = [(rank, f) for rank, f in enumerate(failures) if f is not None]
    if not failed:
        return
    rank, error = failed[0]
    message = str(error)
    everywhere = len(failed) == len(failures) and all(str(f) == message for _, f in failed)
    raise _agreed(error, message if everywhere else f"{message} (on rank {rank})")


def _agreed(error: UserError, message: str) -> UserError:
    """The same error (its type, so its exit code) with `message`, marked agreed: rank 0 prints it for all."""
    error.args, error.agreed = (message,), True
    return error


def leave_with(error: UserError, name: str) -> None:
    """Stop this rank mid-step with `error`: join (the peers' all-reduces finish without it), then every rank raises
    it. The peers notice the missing rank in their next agreed check and call `follow_leaver`."""
    if _alone():
        raise _agreed(error, str(error)) from None   # the input pipeline's traceback says nothing more
    join()
    raise_first(allgather_object(error, name))


def follow_leaver(name: str) -> None:
    """A peer left with `leave_with`: join it and raise its error here too."""
    join()
    raise_first(allgather_object(None, name))


def broadcast_variables(variables, name: str = "hvdtrain.broadcast", group: int | None = None) -> None:
    """Make every rank's variables equal to rank 0's (model weights, optimizer slots); with `group` (the ranks of a
    part of the model), every replica's equal to the group's first rank's (a collective of the group's ranks).

    One traced function assigns every variable from a broadcast of rank 0's value. The variables are captured,
    not passed in: a Keras 3 variable passed into a tf.function arrives as a tensor without `assign`, which is why
    Horovod's own broadcast_variables fails on Keras 3.
    """
    import tensorflow as tf
    h = hvd()
    variables = list(variables)
    if not variables or _group_size(group) == 1:
        return
    root, members = _group_root(group), _process_set(group)
    traffic.count_variables("broadcast", variables)

    @tf.function
    def assign_from_root():
        for i, variable in enumerate(variables):
            variable.assign(h.broadcast(tf.convert_to_tensor(variable), root, name=f"{name}.{i}", process_set=members))
    assign_from_root()


def variable_averager(variables, name: str, group: int | None = None, kind: str = "weights"):
    """A function that sets every rank's `variables` to their average over ranks (or over `group`'s ranks, a part's
    replicas), in one grouped all-reduce (traced once, the variables captured as in broadcast_variables). Calling it
    is the collective; its bytes count as `kind`."""
    import tensorflow as tf
    h = hvd()
    variables = list(variables)
    members = _process_set(group)

    @tf.function
    def all_reduce():
        averaged = h.grouped_allreduce([tf.convert_to_tensor(v) for v in variables], op=h.Average, name=name,
                                       process_set=members)
        for variable, value in zip(variables, averaged):
            variable.assign(value)

    def average():
        traffic.count_variables(kind, variables)
        all_reduce()
    return average


def build_info() -> dict:
    """What Horovod was built with, for `hvdtrain doctor`. Not a collective."""
    from hvdtrain.backend._horovod import version
    h = hvd()
    return {
        "horovod": version(),
        "controllers": {"mpi": h.mpi_built(), "gloo": h.gloo_built()},
        "tensor_operations": {"nccl": h.nccl_built(), "mpi": h.mpi_built(), "gloo": h.gloo_built(),
                              "ddl": h.ddl_built(), "ccl": h.ccl_built()},
    }


HOROVOD_MARKS = ("Horovod", "gloo", "Gloo", "HorovodAllreduce", "HorovodBroadcast", "HorovodAllgather")


def from_horovod(exc: BaseException) -> bool:
    """Did Horovod raise this (a collective op or its runtime)? Horovod tells only in the text."""
    return any(mark in str(exc) for mark in HOROVOD_MARKS)


def collective_failure(exc: BaseException, where: str, run_dir) -> UserError | None:
    """A CollectiveFailure naming `where` if exc came out of a failed collective (a peer died, stalled or lost its
    network), else None. Horovod reports these only as text, so this is where that text is recognised."""
    from hvdtrain.errors import CollectiveFailure, first_line
    if isinstance(exc, UserError) or not from_horovod(exc):
        return None
    return CollectiveFailure(
        f"rank {hvd().rank()}: a collective failed at {where} ({first_line(exc, HOROVOD_MARKS)}): a peer rank died, "
        f"stalled or lost its network. The checkpoints in {run_dir}/checkpoints are intact: rerun the same command "
        "to resume.")


def gather_agreed(fn, name: str) -> list:
    """Run fn on every rank and gather every rank's (small, picklable) result in one collective; if any rank raised a
    UserError, every rank raises it instead (see agree_on_errors)."""
    try:
        result, failure = fn(), None
    except UserError as exc:
        result, failure = None, exc
    pairs = allgather_object((failure, result), name=name)
    raise_first([f for f, _ in pairs])
    return [r for _, r in pairs]
