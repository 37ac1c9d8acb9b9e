"""Data-parallel prediction with no model synchronisation: the single-process run's batches are dealt whole to the
ranks in turn (rank r: batches r, r+size, ...; see data.sharding.dealt_batches), so every example is computed in
the same batch (size, members, order) at any number of ranks, and the outputs are bit for bit those of one process
on any machine. The results are written once, in input order; nothing is padded or dropped (also with fewer inputs
than ranks)."""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from hvdtrain import backend
from hvdtrain.data.sharding import in_batch_order
from hvdtrain.errors import DataError, UserError
from hvdtrain.inference.evaluate import read_errors, reading
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


def _scores(step, batches):
    import tensorflow as tf
    for x in reading(batches, predict_read_errors):
        yield {k: v.numpy() for k, v in step(tf.cast(x, tf.float32)).items()}


def predict_read_errors():
    return read_errors("input data", doing="predicting")


class OrderedOutput:
    """One output file written from all ranks, in input order, without holding all rows anywhere.

    Each rank streams its batches' rows into a hidden part file beside the output and notes each batch's byte
    length; rank 0 then copies the batches from the parts in batch order (input order) into a temporary file and
    renames it into place. A failure anywhere leaves no output file (a previous one stays as it was). The output's
    directory must be shared by all ranks; `check_shared` proves it before any work is done.
    """

    def __init__(self, path, fields, world, token: str, task, paths: bool = False):
        self.path, self.world, self.asked, self.task = Path(path), world, tuple(fields), task
        self.allowed = task.output_fields() + (("path",) if paths else ())   # path: inputs that are files
        self.fields = tuple(f for f in self.allowed if f in fields)   # a fixed order, whatever was asked
        self._file, self.format, self._created = None, None, False
        self.lengths: list[int] = []   # bytes of each batch written by this rank, in order
        # Parts carry a job token, so a stale part left by a killed job can never pass for this job's.
        self._part_name = f"{TMP_PREFIX}{self.path.name}.{token}.part-"

    def part(self, rank: int) -> Path:
        return self.path.parent / f"{self._part_name}{rank}"

    def open(self, class_names=None) -> None:
        """Every rank: check the output path and create this rank's part (so an unwritable path fails early)."""
        if self.path.suffix not in FORMATS:
            raise UserError(f"--output {self.path} must end in {', '.join(FORMATS)} (the format is chosen by the suffix)")
        if not self.fields or set(self.asked) - set(self.allowed):
            raise UserError(f"--fields must be some of {','.join(self.allowed)} for a {self.task.kind} model, "
                            f"got {','.join(self.asked)!r}")
        if self.path.is_dir():
            raise UserError(f"--output {self.path} is a directory; give a file name such as {self.path / 'predictions.npy'}")
        self.class_names = class_names
        try:
            self._file = open(self.part(self.world.rank), "wb")
            self._created = True
        except OSError as exc:
            raise UserError(f"cannot write --output {self.path} ({exc.strerror}); choose a writable path") from None

    def begin(self, paths=None) -> None:
        """Fix the row layout once the inputs are known (text fields are as wide as their longest value)."""
        widths = {f: self.task.outputs for f in ("probs", "labels", "value")}
        widths["name"] = max((len(n) for n in self.class_names), default=1) if self.class_names is not None else 20
        widths["path"] = max((len(p) for p in paths), default=1) if paths else 1
        self.format = FORMATS[self.path.suffix](self.fields, widths)

    def check_shared(self) -> None:
        """Rank 0 must see every rank's part, or it could not merge them."""
        missing = [r for r in range(self.world.size) if not self.part(r).exists()] if self.world.is_chief else []
        if missing:
            raise UserError(f"rank 0 cannot see rank {missing[0]}'s part file in {self.path.parent}: the output "
                            "directory must be on a file system shared by all ranks")

    def write(self, index, values: dict) -> None:
        """One batch's rows; `index`: each row's position among the listed inputs."""
        rows = self.format.rows(index, values)
        try:
            self._file.write(rows)
        except OSError as exc:
            raise UserError(f"cannot write --output {self.path} ({exc.strerror})") from None
        self.lengths.append(len(rows))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def merge(self, total: int, lengths: list[list[int]], writers=None) -> None:
        """Rank 0: header, then every batch in batch order, streamed, into a temporary file renamed into place.
        lengths[r]: rank r's batches' bytes; `writers`: the ranks holding the dealt batches, in dealing order (default
        every rank)."""
        writers = range(self.world.size) if writers is None else writers
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f"{TMP_PREFIX}{self.path.name}.merge")
        try:
            os.fchmod(fd, file_mode())  # the permissions of an ordinary new file, not mkstemp's 0600
            with os.fdopen(fd, "wb") as out:
                out.write(self.format.header(total))
                parts = {rank: open(self.part(rank), "rb") for rank in writers}
                try:
                    for rank, n in in_batch_order([[(r, n) for n in lengths[r]] for r in writers]):
                        _copy(parts[rank], out, n)
                finally:
                    for part in parts.values():
                        part.close()
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


def _copy(src, dst, n: int, chunk: int = 1 << 20) -> None:
    while n > 0:
        data = src.read(min(n, chunk))
        if not data:
            raise OSError(5, "a part file is shorter than its batches")
        dst.write(data)
        n -= len(data)


def predict_to_file(model, share, world, out: OrderedOutput, task, input_shape, class_names=None) -> dict:
    """Score this rank's batches into `out` (already opened), then merge on rank 0. Returns the throughput report."""
    return write_predictions(_scores(scorer(model, task, input_shape), share.dataset), share, world, out, class_names)


def write_predictions(batches, share, world, out: OrderedOutput, class_names=None, writers=None) -> dict:
    """Each batch's prediction fields (`batches`, one dict per batch of `share`, this rank's; a rank that writes
    none, e.g. a pipeline's earlier stage, runs its part inside the iteration) into `out`, then merged on rank 0
    from the `writers` (the ranks holding the dealt batches in dealing order; default the world's reporters: every
    rank, or one per replica). Returns the throughput report."""
    writers = world.reporters() if writers is None else list(writers)
    names = np.asarray(class_names) if class_names is not None else None
    out.begin(share.paths)

    def score():
        written, spans, extra = 0, iter(share.spans), False
        with contextlib.closing(batches):   # a pipeline's stream is finished even when writing fails
            for values in batches:
                span = next(spans, None)
                if span is None:   # more batches than listed
                    extra = True
                    break
                index, values = _identified(share, *span, _named(values, names), out.fields)
                out.write(index, values)
                written += len(index)
        out.close()
        if world.rank in writers and (extra or written != share.count):   # an input changed since it was listed
            read = f"more than {written}" if extra else written
            raise DataError(f"the inputs changed since the start ({read} examples read, {share.count} listed); "
                            "rerun to check them again")

    started, cpu_started = time.perf_counter(), time.process_time()
    backend.agree_on_errors(score, "hvdtrain.predict.score")
    mine = (share.count if world.rank in writers else 0, out.lengths,
            (time.perf_counter() - started, time.process_time() - cpu_started))
    ranks = backend.allgather_object(mine, "hvdtrain.predict.written")
    counts, lengths, times = (list(column) for column in zip(*ranks))
    backend.agree_on_errors(lambda: out.merge(sum(counts), lengths, writers) if world.is_chief else None,
                            "hvdtrain.predict.merge")
    return throughput(counts, times)


def _named(values: dict, names) -> dict:
    """The class's name beside its number (the class folders' names, else the number as text)."""
    if "class" in values:
        values["name"] = names[values["class"]] if names is not None else values["class"].astype(str)
    return values


def _identified(share, start: int, stop: int, values: dict, fields) -> tuple[np.ndarray, dict]:
    """The rows of batch [start, stop): their positions among the listed inputs, and their paths when asked for."""
    index = np.asarray(share.listed[start:stop] if share.listed is not None else range(start, stop), np.int64)
    if "path" in fields:
        values = {**values, "path": np.asarray(share.paths[start:stop])}
    return index, values


def throughput(counts: list[int], times: list[tuple[float, float]]) -> dict:
    """Per rank and total samples/s; the total counts the wall time of the slowest rank. CPU seconds (all threads
    of a rank) tell a busy machine apart from real overhead: equal CPU per sample at any N means none was added."""
    total, wall = sum(counts), max(t for t, _ in times)
    return {"examples": total, "ranks": len(counts), "seconds": wall, "samples_per_sec": total / wall if wall else 0.0,
            "cpu_seconds": sum(c for _, c in times),
            "per_rank": [{"rank": r, "examples": n, "seconds": t, "cpu_seconds": c, "samples_per_sec": n / t if t else 0.0}
                         for r, (n, (t, c)) in enumerate(zip(counts, times))]}


def predict_ordered(model, inputs, world, batch_size: int = 256) -> np.ndarray:
    """model(x) for every input, in input order, gathered on every rank; ranks take whole batches in turn.

    The batches are those of plain Keras, so the outputs equal `model.predict` bit for bit at any number of ranks:
    an array or an unbatched tf.data.Dataset in batches of `batch_size` (= model.predict(x, batch_size=batch_size)),
    a batched dataset in its own batches (= model.predict(dataset); batch_size is not used). Elements may be x or
    (x, y, ...).
    """
    import tensorflow as tf
    step = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    ds = inputs if isinstance(inputs, tf.data.Dataset) else tf.data.Dataset.from_tensor_slices(np.asarray(inputs))
    ds = ds.map(lambda x, *rest: x) if isinstance(ds.element_spec, tuple) else ds
    if len(ds.element_spec.shape) < len(model.input_shape):   # unbatched: the batch dimension is missing
        ds = ds.batch(batch_size)
    view = world.data_view()   # the ranks of a tensor group score the same batches together
    local = [np.asarray(step(x)) for x in ds.shard(view.size, view.rank)]
    parts = backend.allgather_object(local, "hvdtrain.keras.predict")
    ordered = in_batch_order([parts[rank] for rank in world.reporters()])
    return np.concatenate(ordered) if ordered else np.zeros((0, *model.output_shape[1:]), np.float32)
