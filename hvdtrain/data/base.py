"""What every data source offers, and the pipelines of the file-based ones (TFRecords, image folders, image
TFRecords), built once per run and asked for per-rank datasets.

Training: every rank runs the same (agreed) number of steps per epoch; epoch e's order is seeded by (data.seed, e),
so a resumed run continues the same stream. Evaluation and prediction: the single-process run's batches are dealt
whole to the ranks in turn (sharding.dealt_batches), never padded or truncated, so every example is computed in the
same batch whatever the number of ranks, and the ranks' batches merged in batch order are the input order.

File-based sources work on "units" (a TFRecord file, or one image file with its label). Units are listed in sorted
order on every rank, validated (every record parsed, every image decoded; units of a held-out split in contiguous
blocks per rank), and their counts gathered, so no split is ever scanned twice. Training shards by unit (round
robin) when there are at least as many units as ranks, else by record.
"""
from __future__ import annotations

from dataclasses import dataclass

from hvdtrain.data.sharding import batch_owner, dealt_batches, eval_range, per_rank_batch, shard_files
from hvdtrain.errors import DataError

SPLITS = ("train", "test")


@dataclass
class Share:
    """One rank's part of a split: its dealt batches (see sharding.dealt_batches), in order."""
    dataset: object        # tf.data.Dataset of batches: (x, y) for evaluation, x for prediction
    count: int             # examples in this rank's batches
    spans: list            # [start, stop) of each of its batches: positions in the split
    listed: list | None = None   # of every example of the split: its position among the listed inputs (None: the same)
    paths: list | None = None    # of every example of the split: its source file (image inputs)


def share_of(num: int, batch: int, world, make, **inputs) -> Share:
    """The Share of this rank's dealt batches; make(spans) builds their dataset of examples (not yet batched)."""
    import tensorflow as tf
    spans = dealt_batches(num, batch, world.rank, world.size)
    dataset = make(spans).batch(batch).prefetch(tf.data.AUTOTUNE)
    return Share(dataset, sum(b - a for a, b in spans), spans, **inputs)


def span_index(spans) -> list[int]:
    """The positions of the examples in `spans`, in order."""
    return [i for a, b in spans for i in range(a, b)]


def dealt(records, batch: int, world):
    """Of a dataset of a whole split, in input order: the elements of this rank's dealt batches (filter before
    parsing, so a rank decodes only its own examples)."""
    return records.enumerate().filter(lambda i, _: batch_owner(i, batch, world.size) == world.rank) \
        .map(lambda _, record: record)


class Source:
    """A data source of one config. Subclasses: ArraySource (digits, synthetic, npz) and the FileSources."""

    # Re-dealt among the ranks after Horovod Elastic resizes the world (file shards and step counts are not).
    elastic = False

    def __init__(self, cfg):
        self.cfg = cfg

    # what the model sees
    def example_shape(self) -> tuple:
        raise NotImplementedError

    def class_names(self) -> list[str] | None:
        return None

    def has_split(self, split: str) -> bool:
        raise NotImplementedError

    # checks and counts (run under the error agreement: a DataError on any rank stops every rank)
    def validate(self, world, split: str) -> dict:
        """Check this rank's part of a split (readable, parseable, shapes, labels); returns what to gather."""
        raise NotImplementedError

    def adopt(self, split: str, gathered: list) -> None:
        """Take every rank's `validate` result (the same list on every rank)."""

    def diagnose(self, world, split: str) -> str | None:
        """After a read error: this rank's part of the split checked again, so the error can name the file and record
        (a file changed or vanished since the start). None when the part reads fine now."""
        try:
            self.validate(world, split)
        except DataError as exc:
            return str(exc)
        return None

    def local_steps(self, world, global_batch: int) -> int:
        """Training steps per epoch this rank's shard can feed (the trainer agrees on the MIN over ranks)."""
        raise NotImplementedError

    # pipelines
    def train_batches(self, world, global_batch: int, steps: int, first_epoch: int, epochs: int, skip_steps: int = 0):
        raise NotImplementedError

    def eval_share(self, world, split: str, batch: int) -> Share:
        raise NotImplementedError

    def predict_share(self, world, split: str, batch: int) -> Share:
        share = self.eval_share(world, split, batch)
        share.dataset = share.dataset.map(lambda x, y: x)
        return share


def _name(unit) -> str:
    return unit[0] if isinstance(unit, tuple) else str(unit)


def epoch_order(num: int, seed: int, epoch, salt: int = 0):
    """A permutation of range(num) seeded by (seed, epoch, salt); epoch may be a tensor."""
    import tensorflow as tf
    keys = tf.random.stateless_uniform([num], seed=tf.stack([tf.cast(seed, tf.int64) * 1_000_003 + salt,
                                                             tf.cast(epoch, tf.int64)]))
    return tf.argsort(keys, stable=True)


class FileSource(Source):
    """A source read from units (files). Subclasses say how to list units, read their records and parse them."""

    shuffle_records = True   # TFRecords need a shuffle buffer; one-image units are fully shuffled by unit order

    def __init__(self, cfg):
        super().__init__(cfg)
        self._counts: dict[str, dict[int, int]] = {}   # split -> {unit index: valid records}, after validation

    # -------------------------------------------------------------- subclass hooks
    def units(self, split: str) -> list:
        raise NotImplementedError

    def records(self, units: list):
        """tf.data.Dataset of raw records of these units, in order."""
        raise NotImplementedError

    def parse(self, record):
        """raw record -> (x, y) ready for the model (images decoded, resized and scaled)."""
        raise NotImplementedError

    def scan(self, units: list, split: str) -> list[int]:
        """Valid records per unit, raising a DataError that names the unit (and record) of the first problem."""
        raise NotImplementedError

    # -------------------------------------------------------------- validation
    def _validated_units(self, world, split: str) -> list[int]:
        """Indices of the units this rank validates: its training shard, or a contiguous block of a held-out split."""
        n = len(self.units(split))
        if n < world.size:
            return list(range(n)) if world.rank == 0 else []
        if split == "train":
            return list(range(world.rank, n, world.size))
        start, stop = eval_range(n, world.rank, world.size)
        return list(range(start, stop))

    def validate(self, world, split: str) -> dict:
        units = self.units(split)
        mine = self._validated_units(world, split)
        return dict(zip(mine, self.scan([units[i] for i in mine], split)))

    def adopt(self, split: str, gathered: list) -> None:
        counts = {}
        for part in gathered:
            counts.update({int(k): int(v) for k, v in part.items()})
        self._counts[split] = counts
        self.after_adopt(split)

    def after_adopt(self, split: str) -> None:
        """Hook: e.g. image folders drop the files found corrupt (data.bad_files=skip)."""

    def diagnose(self, world, split: str) -> str | None:
        """Re-check this rank's units: a DataError's message, or the first unit whose record count changed."""
        found = super().diagnose(world, split)
        if found or split not in self._counts:
            return found
        units = self.units(split)
        mine = self._validated_units(world, split)
        for i, count in zip(mine, self.scan([units[i] for i in mine], split)):
            if count != self._counts[split].get(i, count):
                return f"{_name(units[i])} held {self._counts[split][i]} records at the start and holds {count} now"
        return None

    def counts(self, split: str) -> list[int]:
        if split not in self._counts:   # not validated under the agreement (e.g. a single-process helper)
            units = self.units(split)
            self._counts[split] = dict(enumerate(self.scan(units, split)))
            self.after_adopt(split)
        units = self.units(split)
        return [self._counts[split][i] for i in range(len(units))]

    # -------------------------------------------------------------- training
    def local_steps(self, world, global_batch: int) -> int:
        return self.local_train_examples(world) // per_rank_batch(global_batch, world.size)

    def local_train_examples(self, world) -> int:
        counts = self.counts("train")
        own = shard_files(list(range(len(counts))), world.rank, world.size)
        if own is not None:
            return sum(counts[i] for i in own)
        return len(range(world.rank, sum(counts), world.size))

    def train_batches(self, world, global_batch, steps, first_epoch, epochs, skip_steps=0):
        import tensorflow as tf
        per_rank = per_rank_batch(global_batch, world.size)
        units = self.units("train")
        self.counts("train")   # validated before any reading
        own = shard_files(units, world.rank, world.size)
        seed, buffer = self.cfg.seed, self.cfg.shuffle_buffer

        def one_epoch(e):
            if own is not None:   # each rank reads only its own units, in a new order every epoch
                order = epoch_order(len(own), seed, e, salt=world.rank)
                records = self.records_by_index(own, order)
            else:                 # fewer units than ranks: every rank reads all, keeps every size-th record
                records = self.records(units).shard(world.size, world.rank)
            if self.shuffle_records:
                records = records.shuffle(buffer, seed=seed * 1_000_003 + e, reshuffle_each_iteration=False)
            parsed = records.map(self.parse, num_parallel_calls=tf.data.AUTOTUNE)
            parsed = self.augment(parsed, e, world)
            # Exactly `steps` batches, or an input error: a file that shrank since validation must not leave this
            # rank short of batches while its peers wait in an all-reduce.
            return parsed.batch(per_rank, drop_remainder=True).take(steps) \
                .apply(tf.data.experimental.assert_cardinality(steps))

        stream = tf.data.Dataset.range(first_epoch, epochs).flat_map(one_epoch).skip(skip_steps)
        return stream.prefetch(tf.data.AUTOTUNE)

    def records_by_index(self, own: list, order):
        """Records of units own[order[0]], own[order[1]], ... (order is a tensor)."""
        raise NotImplementedError

    def augment(self, parsed, epoch, world):
        return parsed

    # -------------------------------------------------------------- evaluation and prediction
    def eval_share(self, world, split, batch):
        import tensorflow as tf
        if not self.has_split(split):
            raise DataError(f"data.source={self.cfg.source} has no {split} split configured")
        units, counts = self.units(split), self.counts(split)

        def make(_):   # every rank reads the records of all units but parses only those of its own batches
            return dealt(self.records(units), batch, world).map(self.parse, num_parallel_calls=tf.data.AUTOTUNE)
        return share_of(sum(counts), batch, world, make, **self.inputs(split))

    def inputs(self, split: str) -> dict:
        """Share fields that map rows back to inputs (listed, paths); none by default."""
        return {}
