"""The run directory: what a run leaves for people (config.yaml, classes.json, metrics.csv, summary.json, model.keras)
and for itself (checkpoints/). Files are written atomically and with the permissions the umask gives any new file,
so colleagues on a shared file system can read a run. A start that fails before training removes what it created.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from hvdtrain.errors import UserError

TMP_PREFIX = ".tmp-"
STOP_FILE = "STOP"   # RUN_DIR/STOP: a graceful stop at the next agreed step (served: removed after the checkpoint)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~umask()


def dir_mode() -> int:
    return 0o777 & ~umask()


def write_atomic(path, data: str | bytes) -> None:
    """Readers see the old or the new content, never half of it; the new file gets the umask's permissions
    (mkstemp's are 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX + path.name)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def make_temp_dir(parent: Path, prefix: str = TMP_PREFIX) -> Path:
    """A private temporary directory given ordinary permissions (mkdtemp's are 0700)."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    path.chmod(dir_mode())
    return path


class RunDir:
    """A run directory. `check()` proves it can be written (every rank, so all fail together) and remembers what it
    had to create; `discard_if_fresh()` removes that again if the run fails before writing anything."""

    def __init__(self, path):
        self.path = Path(path)
        self._created: list[Path] = []

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def check(self) -> "RunDir":
        missing = []
        for parent in [self.path, *self.path.parents]:
            if parent.exists():
                break
            missing.append(parent)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._created = [p for p in reversed(missing)]
            probe = tempfile.NamedTemporaryFile(dir=self.path, prefix=TMP_PREFIX + "probe", delete=True)
            probe.close()
        except OSError as exc:
            raise UserError(f"run directory {self.path} is not writable ({exc.strerror}); choose another with "
                            "--trainer.run_dir=PATH") from None
        return self

    def discard_if_fresh(self) -> None:
        """Undo `check()` when nothing was written: no empty run directories after a failed start."""
        for path in reversed(self._created):
            try:
                path.rmdir()    # only ever removes empty directories
            except OSError:
                break
        self._created = []

    def ensure_checkpoints(self) -> Path:
        self.checkpoints.mkdir(exist_ok=True)
        return self.checkpoints

    def write_config(self, cfg) -> None:
        write_atomic(self.path / "config.yaml", cfg.to_yaml())

    def write_classes(self, names: list[str] | None) -> None:
        if names:
            write_json(self.path / "classes.json", list(names))

    def read_classes(self) -> list[str] | None:
        path = self.path / "classes.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def write_summary(self, summary: dict) -> None:
        write_json(self.path / "summary.json", summary)

    def export_model(self, model) -> None:
        """model.keras for users (architecture and weights, no optimizer: it loads without Horovod or hvdtrain)."""
        tmp = make_temp_dir(self.path)
        try:
            # Rebuilt from its config, not cloned: Keras 3 compiles clones, and the optimizer (with hvdtrain's LR
            # schedule) would then be needed to load the file.
            plain = type(model).from_config(model.get_config())
            plain.set_weights(model.get_weights())
            plain.save(tmp / "model.keras")
            os.chmod(tmp / "model.keras", file_mode())
            os.replace(tmp / "model.keras", self.path / "model.keras")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
