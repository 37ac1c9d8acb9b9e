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


def dealt_batches(num_examples: int, batch: int, rank: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) of the batches one rank computes in evaluation and prediction: the single-process run's batches
    (`batch` examples each, the last one shorter) dealt whole, in turn: rank r takes batches r, r+size, r+2*size, ...
    Every example is thus computed in the same batch (size, members, order) whatever the number of ranks; the CPU
    kernels can give different bits for one example in batches of another size or composition."""
    return [(start, min(start + batch, num_examples)) for start in range(rank * batch, num_examples, size * batch)]


def batch_owner(index, batch: int, size: int):
    """The rank that computes example `index` (an int or a tensor) under `dealt_batches`."""
    return (index // batch) % size


def in_batch_order(parts: list[list]) -> list:
    """Per-batch items of every rank (parts[r][k] belongs to rank r's k-th dealt batch, global batch r + k*size)
    in global batch order, the order of a single-process run."""
    rounds = max((len(p) for p in parts), default=0)
    return [part[k] for k in range(rounds) for part in parts if k < len(part)]
