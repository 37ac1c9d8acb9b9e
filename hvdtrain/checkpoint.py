"""Checkpoints: written by rank 0, atomically; found, checked and restored by every rank alike.

A checkpoint is a directory `checkpoints/ckpt-<global step>` holding the TensorFlow checkpoint of model and
optimizer (weights, slots, step counter and hence the LR schedule position, gradient accumulators, loss scale) and
`meta.json` (epoch, step in epoch, global step, data seed, model signature, config). It is written under a temporary
name and renamed into place, so a kill at any moment leaves the previous checkpoint loadable; readers ignore
temporary directories. The same format serves `hvdtrain train`, the Keras API and predict/evaluate. A checkpoint may
come in parts instead, written in the same temporary directory and renamed by rank 0 once every part is written
(which part a rank writes is its strategy's choice: a pipeline's one `stage-<s>/state` per stage, local SGD's one
`rank-<r>/state` per rank).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hvdtrain import backend
from hvdtrain.errors import UserError
from hvdtrain.rundir import RunDir, file_mode, make_temp_dir, write_json

PREFIX = "ckpt-"


@dataclass
class Position:
    """Where training is. global_step counts optimizer batches since the start; epoch/step_in_epoch follow from it."""
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0

    @classmethod
    def at(cls, global_step: int, steps_per_epoch: int) -> "Position":
        epoch, step = divmod(global_step, steps_per_epoch)
        return cls(epoch, step, global_step)

    def meta(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step}


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "meta.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def latest(run_dir) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_meta(ckpt) -> dict:
    try:
        return json.loads((Path(ckpt) / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"checkpoint {ckpt} has no readable meta.json ({exc}); point at a directory written by hvdtrain") from None


def signature(model, input_shape, num_classes: int, model_name: str) -> dict:
    """What must match for a checkpoint to be loaded into a model: names and shapes of every weight."""
    trainable = {id(w) for w in model.trainable_weights}
    return {"model": model_name, "input_shape": list(input_shape), "num_classes": int(num_classes),
            "weights": [[_weight_name(w), list(w.shape)] for w in model.weights],
            "frozen": [_weight_name(w) for w in model.weights if id(w) not in trainable]}


def _weight_name(w) -> str:
    return getattr(w, "path", None) or w.name.removesuffix(":0")


def check_compatible(ckpt, meta: dict, expected: dict, check_layout=None) -> None:
    """Refuse a checkpoint of another model; `check_layout(ckpt, found, expected)` refuses one written by a layout
    this run cannot continue (the strategies know which; see strategies.check_layout)."""
    found = meta.get("signature", {})
    if check_layout is not None:
        check_layout(ckpt, found, expected)
    for key in ("model", "input_shape", "num_classes"):
        if found.get(key) != expected[key]:
            raise UserError(f"checkpoint {ckpt} belongs to another model ({key} is {found.get(key)!r}, this run has "
                            f"{expected[key]!r}); use a fresh --trainer.run_dir or the config that wrote it")
    theirs, ours = found.get("weights", []), expected["weights"]
    for i, ((their_name, their_shape), (our_name, our_shape)) in enumerate(zip(theirs, ours)):
        if their_shape != our_shape:
            named = "" if their_name == our_name else f" as {their_name}"
            raise UserError(f"checkpoint {ckpt} belongs to another model (weight {i}, {our_name}: shape {our_shape} "
                            f"here, {their_shape} in the checkpoint{named}); use a fresh --trainer.run_dir or the "
                            "config that wrote it")
    if len(theirs) != len(ours):
        raise UserError(f"checkpoint {ckpt} belongs to another model ({len(theirs)} weights in the checkpoint, "
                        f"{len(ours)} here); use a fresh --trainer.run_dir or the config that wrote it")
    if "frozen" in found and found["frozen"] != expected.get("frozen", found["frozen"]):
        raise UserError(f"checkpoint {ckpt} was trained with other layers frozen ({len(found['frozen'])} frozen "
                        f"weights there, {len(expected['frozen'])} here): its optimizer state does not fit; resume "
                        "with the model.trainable_from that wrote it, or use a fresh --trainer.run_dir")


def state_path(ckpt, part: str | None = None) -> Path:
    """Where model and optimizer are stored: `state`, or one part's `<part>/state` (`stage-1`, `rank-0`)."""
    return Path(ckpt) / "state" if part is None else Path(ckpt) / part / "state"


def restore(ckpt, model, optimizer=None, part: str | None = None) -> None:
    import tensorflow as tf
    parts = {"model": model} if optimizer is None else {"model": model, "optimizer": optimizer}
    try:
        status = tf.train.Checkpoint(**parts).read(str(state_path(ckpt, part)))
        status.assert_existing_objects_matched() if optimizer is not None else status.expect_partial()
    except (ValueError, AssertionError, tf.errors.OpError) as exc:
        raise UserError(f"cannot restore checkpoint {ckpt}: {str(exc).splitlines()[0]}") from None


def weights_digest(model) -> str:
    """A hash of every weight's bytes: equal digests mean bit-identical replicas."""
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


def agreed_digest(model, world) -> str:
    """Every rank's weight digest, compared (a collective): replicas that differ are a bug, never a silent result.
    Each part of the model (a pipeline's stage) is compared over its replicas; the digest is that of the parts'
    digests in order (the one digest, with one part)."""
    digests = backend.allgather_object(weights_digest(model), "hvdtrain.digest")
    per_part = [[digests[r] for r in ranks] for ranks in world.replica_sets()]
    if any(len(set(replicas)) != 1 for replicas in per_part):
        raise UserError(f"replicas diverged: weight digests differ across ranks {digests}; this is a bug, please report it",
                        agreed=True)
    if len(per_part) == 1:
        return digests[0]
    return hashlib.sha256("".join(replicas[0] for replicas in per_part).encode()).hexdigest()


class Checkpointer:
    """Saves model + optimizer + position into a run directory: rank 0 writes, other ranks get `NullCheckpointer`
    (call sites never test the rank). `meta` holds what is stored with every checkpoint (signature, config, ...)."""

    def __init__(self, run: RunDir, meta: dict, keep: int):
        self.run, self.meta, self.keep = run, meta, keep
        self.last_step = -1

    @classmethod
    def for_part(cls, world, run: RunDir, meta: dict, keep: int, part: str | None, writes: bool,
                 write=None) -> "Checkpointer":
        """The checkpointer of a rank that writes `part` of each checkpoint (None: the whole, rank 0 alone), or
        writes nothing (`writes` false) but takes part in writing the parts (a collective). `write(model, directory)`
        writes a part into the checkpoint's directory (default: model and optimizer into `<part>/state`)."""
        if part is not None:
            return PartedCheckpointer(run, meta, keep, world, part, writes, write)
        return cls(run, meta, keep) if writes else NullCheckpointer(run, meta, keep)

    def save(self, model, position: Position, world_size: int) -> Path | None:
        """Write a checkpoint at `position` (once per global step), then prune old ones."""
        if position.global_step == self.last_step:
            return None
        tmp = make_temp_dir(self.run.ensure_checkpoints())
        try:
            write_state(model, state_path(tmp))
            return self._commit(tmp, position, world_size)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _commit(self, tmp: Path, position: Position, world_size: int) -> Path:
        """meta.json last, then the rename that makes the checkpoint exist; then prune."""
        final = tmp.parent / f"{PREFIX}{position.global_step:08d}"
        write_json(tmp / "meta.json", {**self.meta, **position.meta(), "num_ranks": world_size})
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in list_checkpoints(self.run.path)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        self.last_step = position.global_step
        return final


def write_state(model, path: Path, optimizer: bool = True) -> None:
    """The TensorFlow checkpoint of the model (and its optimizer) at `path`."""
    import tensorflow as tf
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = {"model": model, "optimizer": model.optimizer} if optimizer else {"model": model}
    tf.train.Checkpoint(**parts).write(str(path))
    for written in path.parent.iterdir():
        os.chmod(written, file_mode())


class PartedCheckpointer(Checkpointer):
    """A checkpoint in parts (a collective): rank 0 makes the temporary directory, the ranks that `write` write their
    `part` into it, and once all have written (agreed: a failed write fails every rank, and rank 0 removes the
    directory) rank 0 renames it into place."""

    def __init__(self, run: RunDir, meta: dict, keep: int, world, part: str, writes: bool, write=None):
        super().__init__(run, meta, keep)
        self.world, self.part, self.writes = world, part, writes
        self.write = write or (lambda model, tmp: write_state(model, state_path(tmp, part)))

    def save(self, model, position, world_size):
        if position.global_step == self.last_step:
            return None
        w = self.world
        tmp = Path(backend.broadcast_object(str(make_temp_dir(self.run.ensure_checkpoints())) if w.is_chief else "",
                                            "hvdtrain.checkpoint.dir"))
        try:
            backend.agree_on_errors(lambda: self._write_part(model, tmp) if self.writes else None,
                                    "hvdtrain.checkpoint.parts")
        except BaseException:
            if w.is_chief:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if w.is_chief:
            return self._commit(tmp, position, world_size)
        self.last_step = position.global_step
        return None

    def _write_part(self, model, tmp: Path) -> None:
        try:
            self.write(model, tmp)
        except UserError:
            raise
        except Exception as exc:   # agreed, so the other parts' writers do not wait for this one
            from hvdtrain.errors import first_line
            raise UserError(f"cannot write the checkpoint's {self.part} into {tmp.parent}: {first_line(exc)}") from None


class NullCheckpointer(Checkpointer):
    def save(self, model, position, world_size):
        self.last_step = position.global_step
        return None


def resume(run: RunDir, model, mode: str, expected_signature: dict, agree: bool = True, part: str | None = None,
           check_layout=None, restore_with=None) -> tuple[Position, Path | None]:
    """Restore the run's latest checkpoint into model and optimizer, on every rank alike (rank 0's choice decides:
    ranks without the shared file system cannot disagree silently). mode: auto | never | always. `part`: the part
    this rank restores (see Checkpointer.for_part); `restore_with(ckpt, meta, model)` restores instead (a strategy
    whose checkpoints another layout may have written)."""
    found = str(latest(run.path) or "")
    if agree:
        found = backend.broadcast_object(found, "hvdtrain.latest")
    if not found:
        if mode == "always":
            raise UserError(f"trainer.resume=always but {run} holds no checkpoint; train first or use resume=auto")
        return Position(), None
    if mode == "never":
        raise UserError(f"{run} already holds checkpoint {Path(found).name} and trainer.resume=never; "
                        "use a fresh --trainer.run_dir or --resume")
    meta = read_meta(Path(found))
    check_compatible(Path(found), meta, expected_signature, check_layout)
    if restore_with is not None:
        restore_with(Path(found), meta, model)
    else:
        restore(Path(found), model, model.optimizer, part)
    return Position(meta["epoch"], meta["step_in_epoch"], meta["global_step"]), Path(found)
