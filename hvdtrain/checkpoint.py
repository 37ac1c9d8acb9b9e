"""Run directory and checkpoints.

A checkpoint is a directory `checkpoints/ckpt-<global step>` holding the TensorFlow checkpoint of model and
optimizer (weights, slots, step counter, hence the LR schedule position) and `meta.json` (epoch, step in epoch,
data seed, model signature, config). It is written under a temporary name and renamed into place, so a kill
at any moment leaves the previous checkpoint loadable; readers ignore temporary directories.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from hvdtrain.errors import UserError

CKPT_PREFIX = "ckpt-"
TMP_PREFIX = ".tmp-"


def write_atomic(path: Path, text: str) -> None:
    """Write a small file so that readers see the old or the new content, never half of it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX + path.name)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def prepare_run_dir(run_dir: str) -> Path:
    """Create the run directory and prove it is writable (every rank checks, so all fail together)."""
    path = Path(run_dir)
    try:
        (path / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=TMP_PREFIX + "probe", delete=True)
        probe.close()
    except OSError as exc:
        raise UserError(f"run directory {path} is not writable ({exc.strerror}); choose another with --trainer.run_dir=PATH") from None
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(CKPT_PREFIX) and (p / "meta.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def latest(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_meta(ckpt: Path) -> dict:
    try:
        return json.loads((Path(ckpt) / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"checkpoint {ckpt} has no readable meta.json ({exc}); point at a directory written by hvdtrain") from None


def save(run_dir: Path, model, optimizer, meta: dict, keep: int) -> Path:
    """Rank 0 only. Write into a temporary directory, fsync, rename into place, then prune old ones."""
    import tensorflow as tf
    root = Path(run_dir) / "checkpoints"
    final = root / f"{CKPT_PREFIX}{meta['global_step']:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=TMP_PREFIX))
    try:
        tf.train.Checkpoint(model=model, optimizer=optimizer).write(str(tmp / "state"))
        write_json(tmp / "meta.json", meta)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def signature(model, input_shape, num_classes: int, model_name: str) -> dict:
    """What must match for a checkpoint to be loaded into a model."""
    return {"model": model_name, "input_shape": list(input_shape), "num_classes": int(num_classes),
            "weight_shapes": [list(w.shape) for w in model.weights]}


def check_compatible(ckpt: Path, meta: dict, expected: dict) -> None:
    found = meta.get("signature", {})
    for key in ("model", "input_shape", "num_classes", "weight_shapes"):
        if found.get(key) != expected[key]:
            what = "weight shapes differ" if key == "weight_shapes" else f"{key} is {found.get(key)!r}, this run has {expected[key]!r}"
            raise UserError(f"checkpoint {ckpt} belongs to another model ({what}); "
                            "use a fresh --trainer.run_dir or the config that wrote it")


def restore(ckpt: Path, model, optimizer=None) -> None:
    import tensorflow as tf
    parts = {"model": model} if optimizer is None else {"model": model, "optimizer": optimizer}
    try:
        status = tf.train.Checkpoint(**parts).read(str(Path(ckpt) / "state"))
        status.assert_existing_objects_matched() if optimizer is not None else status.expect_partial()
    except (ValueError, AssertionError, tf.errors.OpError) as exc:
        raise UserError(f"cannot restore checkpoint {ckpt}: {str(exc).splitlines()[0]}") from None
