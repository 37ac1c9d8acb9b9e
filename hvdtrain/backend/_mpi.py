"""The one place mpi4py is imported: MPI itself, for what Horovod's collectives do not do (the raw MPI baseline of
the benchmarks, the library version doctor reports; point-to-point messages next). Imported lazily, like Horovod."""
from __future__ import annotations


def mpi():
    """mpi4py's MPI module (MPI_Init runs on first import; under Horovod it shares the same MPI)."""
    from mpi4py import MPI
    return MPI


def library_version() -> str:
    """The first line of the MPI library's version, or why it is unavailable (reported, never raised)."""
    try:
        return mpi().Get_library_version().splitlines()[0].strip()
    except Exception as exc:  # mpi4py missing or built against a different MPI
        return f"unavailable ({exc})"
