"""Data-parallel prediction: each rank scores one contiguous share of the inputs, with no model synchronisation;
the results are written once, in input order. Shares are never padded, so concatenating the ranks' rows in rank
order gives every input exactly once, whatever the number of ranks (also with fewer inputs than ranks)."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from hvdtrain import dist
from hvdtrain.data import eval_range
from hvdtrain.errors import DataError, UserError, first_line
from hvdtrain.inference.formats import FORMATS
from hvdtrain.rundir import TMP_PREFIX, file_mode


def scorer(model, task, input_shape: tuple):
    """A tf.function x -> {field: values} for the task; its input signature fits every batch size (a share's last
    batch is usually smaller), so it traces once."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((None, *input_shape), tf.float32)])
    def step(x):
        return task.predictions(model(x, training=False))
    step.get_concrete_function()  # trace now, so the throughput measured is the steady state
    return step


def _scores(step, batches, class_names):
    import tensorflow as tf
    try:
        for x in batches:
            values = {k: v.numpy() for k, v in step(tf.cast(x, tf.float32)).items()}
            if "class" in values:
                values["name"] = class_names[values["class"]] if class_names is not None else values["class"].astype(str)
            yield values
    except tf.errors.OpError as exc:
        kind = "corrupt" if isinstance(exc, tf.errors.DataLossError) else "unreadable or malformed"
        raise DataError(f"{kind} input data while predicting ({first_line(exc)})") from None


class OrderedOutput:
    """One output file written from all ranks, in input order, without holding all rows anywhere.

    Each rank streams its rows into a hidden part file beside the output; rank 0 then concatenates the parts in rank
    order (the shares are contiguous, so that is input order) into a temporary file and renames it into place. A
    failure anywhere leaves no output file (a previous one stays as it was). The output's directory must be shared by
    all ranks; `check_shared` proves it before any work is done.
    """

    def __init__(self, path, fields, world, token: str, task):
        self.path, self.world, self.asked, self.task = Path(path), world, tuple(fields), task
        self.fields = tuple(f for f in task.output_fields() if f in fields)   # a fixed order, whatever was asked
        self._file, self.format, self.first, self._created = None, None, 0, False
        # Parts carry a job token, so a stale part left by a killed job can never pass for this job's.
        self._part_name = f"{TMP_PREFIX}{self.path.name}.{token}.part-"

    def part(self, rank: int) -> Path:
        return self.path.parent / f"{self._part_name}{rank}"

    def open(self, class_names=None) -> None:
        """Every rank: check the output path and create this rank's part (so an unwritable path fails early)."""
        if self.path.suffix not in FORMATS:
            raise UserError(f"--output {self.path} must end in {', '.join(FORMATS)} (the format is chosen by the suffix)")
        allowed = self.task.output_fields()
        if not self.fields or set(self.asked) - set(allowed):
            raise UserError(f"--fields must be some of {','.join(allowed)} for a {self.task.kind} model, "
                            f"got {','.join(self.asked)!r}")
        if self.path.is_dir():
            raise UserError(f"--output {self.path} is a directory; give a file name such as {self.path / 'predictions.npy'}")
        widths = {f: self.task.outputs for f in ("probs", "labels", "value")}
        name_width = max((len(n) for n in class_names), default=1) if class_names is not None else 20
        self.format = FORMATS[self.path.suffix](self.fields, widths, name_width)
        try:
            self._file = open(self.part(self.world.rank), "wb")
            self._created = True
        except OSError as exc:
            raise UserError(f"cannot write --output {self.path} ({exc.strerror}); choose a writable path") from None

    def check_shared(self) -> None:
        """Rank 0 must see every rank's part, or it could not merge them."""
        missing = [r for r in range(self.world.size) if not self.part(r).exists()] if self.world.is_chief else []
        if missing:
            raise UserError(f"rank 0 cannot see rank {missing[0]}'s part file in {self.path.parent}: the output "
                            "directory must be on a file system shared by all ranks")

    def write(self, values: dict) -> None:
        try:
            self._file.write(self.format.rows(self.first, values))
        except OSError as exc:
            raise UserError(f"cannot write --output {self.path} ({exc.strerror})") from None
        self.first += len(next(iter(values.values())))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def merge(self, total: int) -> None:
        """Rank 0: header, then the parts in rank order, streamed, into a temporary file renamed into place."""
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f"{TMP_PREFIX}{self.path.name}.merge")
        try:
            os.fchmod(fd, file_mode())  # the permissions of an ordinary new file, not mkstemp's 0600
            with os.fdopen(fd, "wb") as out:
                out.write(self.format.header(total))
                for rank in range(self.world.size):
                    with open(self.part(rank), "rb") as part:
                        shutil.copyfileobj(part, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            raise UserError(f"cannot write --output {self.path} ({exc.strerror})") from None
        finally:
            Path(tmp).unlink(missing_ok=True)

    def discard(self) -> None:
        """Every rank, always: remove this rank's part (after the merge, or after a failure)."""
        self.close()
        if self._created:
            self.part(self.world.rank).unlink(missing_ok=True)


def predict_to_file(model, share, world, out: OrderedOutput, task, input_shape, class_names=None) -> dict:
    """Score this rank's share into `out` (already opened), then merge on rank 0. Returns the throughput report."""
    step = scorer(model, task, input_shape)
    names = np.asarray(class_names) if class_names is not None else None
    counts = dist.allgather_object(share.count, "hvdtrain.predict.counts") if world.size > 1 else [share.count]
    out.first = sum(counts[: world.rank])  # the global index of this rank's first row

    def score():
        for values in _scores(step, share.dataset, names):
            out.write(values)
        out.close()

    started, cpu_started = time.perf_counter(), time.process_time()
    dist.agree_on_errors(score, "hvdtrain.predict.score")
    mine = (time.perf_counter() - started, time.process_time() - cpu_started)
    times = dist.allgather_object(mine, "hvdtrain.predict.seconds") if world.size > 1 else [mine]
    dist.agree_on_errors(lambda: out.merge(sum(counts)) if world.is_chief else None, "hvdtrain.predict.merge")
    return throughput(counts, times)


def throughput(counts: list[int], times: list[tuple[float, float]]) -> dict:
    """Per rank and total samples/s; the total counts the wall time of the slowest rank. CPU seconds (all threads
    of a rank) tell a busy machine apart from real overhead: equal CPU per sample at any N means none was added."""
    total, wall = sum(counts), max(t for t, _ in times)
    return {"examples": total, "ranks": len(counts), "seconds": wall, "samples_per_sec": total / wall if wall else 0.0,
            "cpu_seconds": sum(c for _, c in times),
            "per_rank": [{"rank": r, "examples": n, "seconds": t, "cpu_seconds": c, "samples_per_sec": n / t if t else 0.0}
                         for r, (n, (t, c)) in enumerate(zip(counts, times))]}


def predict_ordered(model, inputs, world, batch_size: int = 256) -> np.ndarray:
    """model(x) for every input, in input order, gathered on every rank; each rank scores 1/size of them.

    An array is split into contiguous shares. A tf.data.Dataset (batched or not; elements x or (x, y, ...)) is
    unbatched and dealt round robin (example i to rank i % size), so its length need not be known.
    """
    import tensorflow as tf
    step = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def outputs(batches) -> np.ndarray:
        parts = [np.asarray(step(x)) for x in batches]
        return np.concatenate(parts) if parts else np.zeros((0, *model.output_shape[1:]), np.float32)

    def gather(local):
        return dist.allgather_object(local, "hvdtrain.keras.predict") if world.size > 1 else [local]

    if not isinstance(inputs, tf.data.Dataset):
        x = np.asarray(inputs)
        start, stop = eval_range(len(x), world.rank, world.size)
        return np.concatenate(gather(outputs(tf.data.Dataset.from_tensor_slices(x[start:stop]).batch(batch_size))))
    ds = inputs.map(lambda x, *rest: x) if isinstance(inputs.element_spec, tuple) else inputs
    if len(ds.element_spec.shape) == len(model.input_shape):  # batched: the batch dimension comes first
        ds = ds.unbatch()
    parts = gather(outputs(ds.shard(world.size, world.rank).batch(batch_size)))
    ordered = np.empty((sum(len(p) for p in parts), *parts[0].shape[1:]), parts[0].dtype)
    for rank, part in enumerate(parts):
        ordered[rank::world.size] = part
    return ordered
