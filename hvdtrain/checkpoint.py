"""Checkpoints: written by rank 0, atomically; found, checked and restored by every rank alike.

A checkpoint is a directory `checkpoints/ckpt-<global step>` holding the TensorFlow checkpoint of model and
optimizer (weights, slots, step counter and hence the LR schedule position, gradient accumulators, loss scale) and
`meta.json` (epoch, step in epoch, global step, data seed, model signature, config). It is written under a temporary
name and renamed into place, so a kill at any moment leaves the previous checkpoint loadable; readers ignore
temporary directories. The same format serves `hvdtrain train`, the Keras API and predict/evaluate. A checkpoint may
come in parts instead, written in the same temporary directory and renamed by rank 0 once every part is written: a
pipeline's one `stage-<s>/state` per stage (written by the stage's first replica), local SGD's with optimizer state
kept local one `rank-<r>/state` per rank (the same weights, each rank's own optimizer state).
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
    return {"model": model_name, "input_shape": list(input_shape), "num_classes": int(num_classes),
            "weights": [[_weight_name(w), list(w.shape)] for w in model.weights]}


def _weight_name(w) -> str:
    return getattr(w, "path", None) or w.name.removesuffix(":0")


def check_compatible(ckpt, meta: dict, expected: dict) -> None:
    found = meta.get("signature", {})
    if found.get("pipeline") != expected.get("pipeline"):
        raise UserError(f"checkpoint {ckpt} was written by {_layout(found.get('pipeline'))} and this run is "
                        f"{_layout(expected.get('pipeline'))}; resume with the parallel.pipeline_stages and "
                        "parallel.split that wrote it, or use a fresh --trainer.run_dir")
    if found.get("per_rank") != expected.get("per_rank"):
        raise UserError(f"checkpoint {ckpt} holds {_optimizer_state(found.get('per_rank'))} and this run keeps "
                        f"{_optimizer_state(expected.get('per_rank'))}; resume with the ranks and "
                        "trainer.sync_optimizer_state that wrote it, or use a fresh --trainer.run_dir")
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


def _optimizer_state(per_rank) -> str:
    return f"each of {per_rank} ranks' own optimizer state (local SGD)" if per_rank else "one optimizer state"


def _layout(pipeline) -> str:
    if not pipeline:
        return "data-parallel training (no pipeline stages)"
    return f"a {pipeline['stages']}-stage pipeline (stages beginning at {', '.join(pipeline['first_layers'])})"


def state_path(ckpt, part: str | None = None) -> Path:
    """Where model and optimizer are stored: `state`, or one part's `<part>/state` (`stage-1`, `rank-0`)."""
    return Path(ckpt) / "state" if part is None else Path(ckpt) / part / "state"


def part_of(world, per_rank: bool = False) -> str | None:
    """The part of a checkpoint this rank writes and restores: its pipeline stage's, its own (per_rank), or None."""
    if world.stages > 1:
        return f"stage-{world.stage}"
    return f"rank-{world.rank}" if per_rank else None


def restore(ckpt, model, optimizer=None, part: str | None = None) -> None:
    import tensorflow as tf
    parts = {"model": model} if optimizer is None else {"model": model, "optimizer": optimizer}
    try:
        status = tf.train.Checkpoint(**parts).read(str(state_path(ckpt, part)))
        status.assert_existing_objects_matched() if optimizer is not None else status.expect_partial()
    except (ValueError, AssertionError, tf.errors.OpError) as exc:
        raise UserError(f"cannot restore checkpoint {ckpt}: {str(exc).splitlines()[0]}") from None


def restore_model(ckpt, model, meta: dict) -> None:
    """The trained weights (no optimizer) into the whole `model`: from `state`, or from a pipeline's stages (each
    stage's part of the model restored from its `stage-<s>/state`), so serving works the same for both."""
    layout = meta.get("signature", {}).get("pipeline")
    if meta.get("signature", {}).get("per_rank"):
        return restore(ckpt, model, part="rank-0")   # every rank's part holds the same weights
    if not layout:
        return restore(ckpt, model)
    from hvdtrain.pipeline.split import plan
    _, stage_models = plan(model, layout["stages"], tuple(layout["first_layers"][1:]))
    for s, stage_model in enumerate(stage_models):
        restore_stage(ckpt, stage_model, s)


def restore_stage(ckpt, stage_model, stage: int) -> None:
    """One pipeline stage's trained weights, from its `stage-<s>/state` (`hvdtrain serve --stages` loads only its own)."""
    import keras

    class Stage(keras.Model):   # the object path a stage was saved under: model.stage_model
        def __init__(self, stage_model):
            super().__init__()
            self.stage_model = stage_model
    restore(ckpt, Stage(stage_model), part=f"stage-{stage}")


def weights_digest(model) -> str:
    """A hash of every weight's bytes: equal digests mean bit-identical replicas."""
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


def agreed_digest(model, world) -> str:
    """Every rank's weight digest, compared (a collective): replicas that differ are a bug, never a silent result.
    A pipeline compares each stage's replicas; its digest is that of the stages' digests in order."""
    digests = backend.allgather_object(weights_digest(model), "hvdtrain.digest")
    per_stage = [digests[s::world.stages] for s in range(world.stages)]
    if any(len(set(replicas)) != 1 for replicas in per_stage):
        raise UserError(f"replicas diverged: weight digests differ across ranks {digests}; this is a bug, please report it",
                        agreed=True)
    if world.stages == 1:
        return digests[0]
    return hashlib.sha256("".join(replicas[0] for replicas in per_stage).encode()).hexdigest()


class Checkpointer:
    """Saves model + optimizer + position into a run directory: rank 0 writes, other ranks get `NullCheckpointer`
    (call sites never test the rank). `meta` holds what is stored with every checkpoint (signature, config, ...)."""

    def __init__(self, run: RunDir, meta: dict, keep: int):
        self.run, self.meta, self.keep = run, meta, keep
        self.last_step = -1

    @classmethod
    def for_rank(cls, world, run: RunDir, meta: dict, keep: int, per_rank: bool = False) -> "Checkpointer":
        """per_rank: every rank writes its own part (local SGD with local optimizer state)."""
        part = part_of(world, per_rank)
        if part is not None:
            return PartedCheckpointer(run, meta, keep, world, part, writes=per_rank or world.replica == 0)
        return cls(run, meta, keep) if world.is_chief else NullCheckpointer(run, meta, keep)

    def save(self, model, position: Position, world_size: int) -> Path | None:
        """Write a checkpoint at `position` (once per global step), then prune old ones."""
        if position.global_step == self.last_step:
            return None
        tmp = make_temp_dir(self.run.ensure_checkpoints())
        try:
            _write_state(model, state_path(tmp))
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


def _write_state(model, path: Path) -> None:
    import tensorflow as tf
    path.parent.mkdir(exist_ok=True)
    tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(str(path))
    for written in path.parent.iterdir():
        os.chmod(written, file_mode())


class PartedCheckpointer(Checkpointer):
    """A checkpoint in parts (a collective): rank 0 makes the temporary directory, the ranks that `write` write their
    `part` into it, and once all have written (agreed: a failed write fails every rank, and rank 0 removes the
    directory) rank 0 renames it into place."""

    def __init__(self, run: RunDir, meta: dict, keep: int, world, part: str, writes: bool):
        super().__init__(run, meta, keep)
        self.world, self.part, self.writes = world, part, writes

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
            _write_state(model, state_path(tmp, self.part))
        except Exception as exc:   # agreed, so the other parts' writers do not wait for this one
            from hvdtrain.errors import first_line
            raise UserError(f"cannot write the checkpoint's {self.part} into {tmp.parent}: {first_line(exc)}") from None


class NullCheckpointer(Checkpointer):
    def save(self, model, position, world_size):
        self.last_step = position.global_step
        return None


def resume(run: RunDir, model, world, mode: str, expected_signature: dict, agree: bool = True,
           per_rank: bool = False) -> tuple[Position, Path | None]:
    """Restore the run's latest checkpoint into model and optimizer, on every rank alike (rank 0's choice decides:
    ranks without the shared file system cannot disagree silently). mode: auto | never | always. per_rank: each rank
    restores its own part (local SGD's local optimizer state)."""
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
    check_compatible(Path(found), meta, expected_signature)
    restore(Path(found), model, model.optimizer, part_of(world, per_rank))
    return Position(meta["epoch"], meta["step_in_epoch"], meta["global_step"]), Path(found)
