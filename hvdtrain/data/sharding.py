"""Pure sharding arithmetic (no TensorFlow, no ranks beyond plain integers): unit-tested exhaustively."""
from __future__ import annotations

from hvdtrain.errors import DataError, UserError


def per_rank_batch(global_batch: int, size: int) -> int:
    if global_batch % size:
        raise UserError(f"global batch {global_batch} is not divisible by {size} ranks", agreed=True)
    return global_batch // size


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    steps = num_examples // global_batch
    if steps == 0:
        raise DataError(f"the training set has {num_examples} examples, fewer than one global batch of {global_batch}; "
                        "lower trainer.global_batch_size or add data")
    return steps


def shard_files(files: list, rank: int, size: int) -> list | None:
    """One rank's files (round robin over the sorted list), or None when there are fewer files than ranks (then
    every rank reads every file and keeps every size-th record)."""
    return files[rank::size] if len(files) >= size else None


def eval_range(num_examples: int, rank: int, size: int) -> tuple[int, int]:
    """Contiguous [start, stop) for one rank; sizes differ by at most one, every example counted once."""
    base, extra = divmod(num_examples, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)
