"""Data-parallel evaluation and inference: each rank scores its contiguous share; nothing is synchronised but results.

Evaluation: averaging per-rank accuracies is wrong when shards differ in size; summing (correct, loss, count)
over ranks and dividing once is exact and equals a single-process evaluation of the same data.
Inference: shares are contiguous and never padded, so concatenating the ranks' rows in rank order gives every
input exactly once, in input order, whatever the number of ranks (also with fewer inputs than ranks).
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from hvdtrain import checkpoint, data, dist
from hvdtrain.errors import UserError


def _eval_step(model):
    """One traced function per model (cached on it), so per-epoch evaluation does not retrace."""
    step = getattr(model, "_hvdtrain_eval_step", None)
    if step is None:
        loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")

        @tf.function(reduce_retracing=True)
        def step(x, y):
            logits = model(x, training=False)
            loss = tf.reduce_sum(tf.cast(loss_fn(y, logits), tf.float64))
            correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=-1), y), tf.float64))
            return loss, correct
        model._hvdtrain_eval_step = step
    return step


def _local_sums(model, dataset) -> np.ndarray:
    """[loss sum, correct count, example count] over this rank's share."""
    step = _eval_step(model)
    sums = np.zeros(3)
    for x, y in dataset:
        loss, correct = step(x, tf.cast(y, tf.int64))
        sums += (loss.numpy(), correct.numpy(), int(y.shape[0]))
    return sums


def exact_metrics(model, dataset, topo, name: str = "hvdtrain.evaluate") -> dict:
    """Loss and accuracy over every rank's share of `dataset` together, identical on every rank."""
    local = _local_sums(model, dataset)
    loss, correct, count = dist.allreduce_sum(local, name=name) if topo.size > 1 else local
    return {"loss": loss / max(count, 1), "accuracy": correct / max(count, 1), "examples": int(count), "correct": int(correct)}


def evaluate(model, data_cfg, topo, split: str = "test", batch: int = 256) -> dict | None:
    """Exact metrics over a configured split (see data.eval_data); None if the data source has no such split."""
    share = data.eval_data(data_cfg, topo, split, batch)
    return None if share is None else exact_metrics(model, share[0], topo, f"hvdtrain.evaluate.{split}")


# ---------------------------------------------------------------- data-parallel inference

@dataclass
class Share:
    """This rank's contiguous slice of the inputs, in input order: rank r's rows all come before rank r+1's."""
    batches: object   # tf.data.Dataset of input batches (x only)
    count: int        # examples in this share


def array_share(x: np.ndarray, topo, batch: int) -> Share:
    start, stop = data.eval_range(len(x), topo.rank, topo.size)
    return Share(tf.data.Dataset.from_tensor_slices(x[start:stop]).batch(batch), stop - start)


def tfrecord_share(files: list[str], data_cfg, topo, batch: int) -> Share:
    """Whole files in contiguous blocks when every rank can get one (each rank reads only its own files),
    else a contiguous range of the records of all files (every rank reads them to count)."""
    if len(files) >= topo.size:
        first, last = data.eval_range(len(files), topo.rank, topo.size)
        own = files[first:last]
        records, count = tf.data.TFRecordDataset(own), data.scan_tfrecords(own, 0, 1, data_cfg)
    else:
        start, stop = data.eval_range(data.scan_tfrecords(files, 0, 1, data_cfg), topo.rank, topo.size)
        records, count = tf.data.TFRecordDataset(files).skip(start).take(stop - start), stop - start
    parse = data._parser(tuple(data_cfg.input_shape))
    return Share(records.map(lambda r: parse(r)[0]).batch(batch), count)


def _scorer(model):
    """A tf.function x -> (probabilities, predicted class); the class is the argmax of the logits, as in exact_metrics.
    Its input signature fits every batch size (a share's last batch is usually smaller), so it traces once."""
    @tf.function(input_signature=[tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)])
    def step(x):
        logits = model(x, training=False)
        return tf.nn.softmax(logits), tf.argmax(logits, axis=-1)
    step.get_concrete_function()  # trace now, so the throughput measured is the steady state
    return step


def _scores(step, share: Share):
    try:
        for x in share.batches:
            probs, classes = step(x)
            yield probs.numpy(), classes.numpy()
    except tf.errors.DataLossError as exc:
        raise UserError(f"corrupt input data: {exc.message.splitlines()[0]}") from None


FIELDS = ("class", "probs")


class _Format:
    """How rows are encoded: `header` once (written by rank 0 at the merge), `rows` per batch (by each rank)."""
    def __init__(self, fields):
        self.fields = fields

    def header(self, total: int, num_classes: int) -> bytes:
        return b""


class _Npy(_Format):
    """probs: float32 [N, classes]; class: int64 [N]; both: a structured array with fields 'class' and 'probs'."""
    def _dtype(self, num_classes):
        if self.fields == ("probs",):
            return np.dtype("<f4"), (num_classes,)
        if self.fields == ("class",):
            return np.dtype("<i8"), ()
        return np.dtype([("class", "<i8"), ("probs", "<f4", (num_classes,))]), ()

    def header(self, total, num_classes):
        dtype, inner = self._dtype(num_classes)
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                   "fortran_order": False, "shape": (total, *inner)})
        return buf.getvalue()

    def rows(self, first, probs, classes):
        dtype, _ = self._dtype(probs.shape[1])
        if dtype.names is None:
            return np.ascontiguousarray(probs if self.fields == ("probs",) else classes, dtype=dtype).tobytes()
        out = np.empty(len(classes), dtype)
        out["class"], out["probs"] = classes, probs
        return out.tobytes()


_FLOAT = "%.9g"  # enough digits to read back the exact float32


class _Csv(_Format):
    def header(self, total, num_classes):
        columns = ["index"] + (["class"] if "class" in self.fields else []) \
            + ([f"prob_{c}" for c in range(num_classes)] if "probs" in self.fields else [])
        return (",".join(columns) + "\n").encode()

    def rows(self, first, probs, classes):
        lines = []
        for i, (p, c) in enumerate(zip(probs.tolist(), classes.tolist())):
            cells = [str(first + i)] + ([str(c)] if "class" in self.fields else []) \
                + ([_FLOAT % v for v in p] if "probs" in self.fields else [])
            lines.append(",".join(cells) + "\n")
        return "".join(lines).encode()


class _Jsonl(_Format):
    def rows(self, first, probs, classes):
        lines = []
        for i, (p, c) in enumerate(zip(probs.tolist(), classes.tolist())):
            cells = [f'"index": {first + i}'] + ([f'"class": {c}'] if "class" in self.fields else []) \
                + ([f'"probs": [{", ".join(_FLOAT % v for v in p)}]'] if "probs" in self.fields else [])
            lines.append("{" + ", ".join(cells) + "}\n")
        return "".join(lines).encode()


FORMATS = {".npy": _Npy, ".csv": _Csv, ".jsonl": _Jsonl}


class OrderedOutput:
    """One output file written from all ranks, in input order, without holding all rows anywhere.

    Each rank streams its rows into a hidden part file beside the output; rank 0 then concatenates the parts
    in rank order (the shares are contiguous, so that is input order) into a temporary file and renames it
    into place. A failure anywhere leaves no output file (a previous one stays as it was). The output's
    directory must be shared by all ranks; `check_shared` proves it before any work is done.
    """

    def __init__(self, path, fields, topo, token: str):
        self.path, self.topo, self.asked = Path(path), topo, tuple(fields)
        self.fields = tuple(f for f in FIELDS if f in fields)  # a fixed column order, whatever order was asked
        self._file, self.format, self.first, self._created = None, None, 0, False
        # Parts carry a job token, so a stale part left by a killed job can never pass for this job's.
        self._part_name = f"{checkpoint.TMP_PREFIX}{self.path.name}.{token}.part-"

    def part(self, rank: int) -> Path:
        return self.path.parent / f"{self._part_name}{rank}"

    def open(self) -> None:
        """Every rank: check the output path and create this rank's part (so an unwritable path fails early)."""
        if self.path.suffix not in FORMATS:
            raise UserError(f"--output {self.path} must end in {', '.join(FORMATS)} (the format is chosen by the suffix)")
        if not self.fields or set(self.asked) - set(FIELDS):
            raise UserError(f"--fields must be {', '.join(FIELDS)} or both (comma-separated), got {','.join(self.asked)!r}")
        if self.path.is_dir():
            raise UserError(f"--output {self.path} is a directory; give a file name such as {self.path / 'predictions.npy'}")
        self.format = FORMATS[self.path.suffix](self.fields)
        try:
            self._file = open(self.part(self.topo.rank), "wb")
            self._created = True
        except OSError as exc:
            raise UserError(f"cannot write --output {self.path} ({exc.strerror}); choose a writable path") from None

    def check_shared(self) -> None:
        """Rank 0 must see every rank's part, or it could not merge them."""
        missing = [r for r in range(self.topo.size) if not self.part(r).exists()] if self.topo.is_chief else []
        if missing:
            raise UserError(f"rank 0 cannot see rank {missing[0]}'s part file in {self.path.parent}: the output "
                            "directory must be on a file system shared by all ranks")

    def write(self, probs: np.ndarray, classes: np.ndarray) -> None:
        try:
            self._file.write(self.format.rows(self.first, probs, classes))
        except OSError as exc:
            raise UserError(f"cannot write --output {self.path} ({exc.strerror})") from None
        self.first += len(classes)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def merge(self, total: int, num_classes: int) -> None:
        """Rank 0: header, then the parts in rank order, streamed, into a temporary file renamed into place."""
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f"{checkpoint.TMP_PREFIX}{self.path.name}.merge")
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # the permissions of an ordinary new file, not mkstemp's 0600
            with os.fdopen(fd, "wb") as out:
                out.write(self.format.header(total, num_classes))
                for rank in range(self.topo.size):
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
            self.part(self.topo.rank).unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def predict_to_file(model, share: Share, topo, out: OrderedOutput, num_classes: int) -> dict:
    """Score this rank's share into `out` (already opened), then merge on rank 0. Returns the throughput report."""
    step = _scorer(model)
    counts = dist.allgather_object(share.count, "hvdtrain.predict.counts")
    out.first = sum(counts[: topo.rank])  # the global index of this rank's first row

    def score():
        for probs, classes in _scores(step, share):
            out.write(probs, classes)
        out.close()

    started, cpu_started = time.perf_counter(), time.process_time()
    dist.agree_on_errors(score, "hvdtrain.predict.score")
    times = dist.allgather_object((time.perf_counter() - started, time.process_time() - cpu_started), "hvdtrain.predict.seconds")
    dist.agree_on_errors(lambda: out.merge(sum(counts), num_classes) if topo.is_chief else None, "hvdtrain.predict.merge")
    return throughput(counts, times)


def throughput(counts: list[int], times: list[tuple[float, float]]) -> dict:
    """Per rank and total samples/s; the total counts the wall time of the slowest rank. CPU seconds (all threads
    of a rank) tell a busy machine apart from real overhead: equal CPU per sample at any N means none was added."""
    total, wall = sum(counts), max(t for t, _ in times)
    return {"examples": total, "ranks": len(counts), "seconds": wall, "samples_per_sec": total / wall if wall else 0.0,
            "cpu_seconds": sum(c for _, c in times),
            "per_rank": [{"rank": r, "examples": n, "seconds": t, "cpu_seconds": c, "samples_per_sec": n / t if t else 0.0}
                         for r, (n, (t, c)) in enumerate(zip(counts, times))]}


# ---------------------------------------------------------------- the Keras-API helper

def _outputs(model, batches) -> np.ndarray:
    step = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    parts = [step(x).numpy() for x in batches]
    return np.concatenate(parts) if parts else np.zeros((0, *model.output_shape[1:]), np.float32)


def predict_ordered(model, inputs, topo, batch_size: int = 256) -> np.ndarray:
    """model(x) for every input, in input order, gathered on every rank; each rank scores 1/size of them.

    An array is split into contiguous shares. A tf.data.Dataset (batched or not; elements x or (x, y, ...))
    is unbatched and dealt round robin (example i to rank i % size), so its length need not be known.
    """
    if not isinstance(inputs, tf.data.Dataset):
        x = np.asarray(inputs)
        start, stop = data.eval_range(len(x), topo.rank, topo.size)
        local = _outputs(model, tf.data.Dataset.from_tensor_slices(x[start:stop]).batch(batch_size))
        return np.concatenate(dist.allgather_object(local, "hvdtrain.keras.predict"))
    ds = inputs.map(lambda x, *rest: x) if isinstance(inputs.element_spec, tuple) else inputs
    if len(ds.element_spec.shape) == len(model.input_shape):  # batched: the batch dimension comes first
        ds = ds.unbatch()
    parts = dist.allgather_object(_outputs(model, ds.shard(topo.size, topo.rank).batch(batch_size)), "hvdtrain.keras.predict")
    ordered = np.empty((sum(len(p) for p in parts), *parts[0].shape[1:]), parts[0].dtype)
    for rank, part in enumerate(parts):
        ordered[rank::topo.size] = part
    return ordered
