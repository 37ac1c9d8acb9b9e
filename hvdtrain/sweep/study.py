"""The sweep's state: an Optuna study in DIR/study.journal (JournalStorage, file backend, symlink lock: safe on NFS,
where SQLite is not), and one guard so that two drivers never work in the same DIR at once.

What the journal holds survives the driver being killed at any point: the settings the sweep was started with
(a rerun must bring the same ones), every trial's parameters and state, the per-epoch values the pruner saw, and
where each running trial's processes are (user attributes). Optuna 5 only: a RUNNING trial of an earlier driver is
re-attached with optuna.trial.Trial(study, frozen._trial_id).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from pathlib import Path

from hvdtrain.errors import UserError
from hvdtrain.sweep.space import Space, SpaceError

STUDY_NAME = "hvdtrain-sweep"
JOURNAL = "study.journal"
DRIVER_LOCK = "driver.lock"


class DriverLock:
    """An exclusive lock on DIR/driver.lock for as long as this driver runs (the kernel drops it when the process dies,
    even by SIGKILL, so a rerun never waits for a dead driver)."""

    def __init__(self, out: Path):
        self.path = out / DRIVER_LOCK
        self.fd = None

    def __enter__(self) -> "DriverLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise UserError(f"another hvdtrain sweep ({holder}) is running in {self.path.parent}; wait for it "
                                "to end or stop it first (two drivers would run the same trials twice)") from None
            if exc.errno != errno.ENOLCK:   # a file system without locks: go on unguarded
                raise
            fd = os.open(self.path, os.O_RDWR)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class SweepStudy:
    """The Optuna study of one sweep directory, with the settings check, per-trial sampler seeds and re-attaching."""

    def __init__(self, out: Path, space: Space, settings: dict):
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.space, self.out = space, out
        path = str(out / JOURNAL)
        storage = JournalStorage(JournalFileBackend(path, lock_obj=JournalFileSymlinkLock(path)))
        pruner = self._pruner()
        exists = any(s.study_name == STUDY_NAME for s in storage.get_all_studies())
        if exists:
            self.study = optuna.load_study(study_name=STUDY_NAME, storage=storage, pruner=pruner)
        else:
            self.study = optuna.create_study(study_name=STUDY_NAME, storage=storage, pruner=pruner,
                                             direction=space.objective.direction)
        settings = json.loads(json.dumps(settings))
        stored = self.study.user_attrs.get("settings")
        if stored is None:
            # A new sweep (or one whose driver died before it got this far): enqueue first, settings last, so a
            # settings entry always means the enqueued trials are there.
            for entry in space.enqueue:
                self.study.enqueue_trial(_optuna_params(space, entry), skip_if_exists=True)
            self.study.set_user_attr("settings", settings)
        elif stored != settings:
            raise SpaceError(f"{out} holds a sweep started with other settings ({_difference(stored, settings)}); "
                             "rerun it with the same --config, overrides, --space and ranks, or use a new --output")
        self.distributions = space.distributions()

    def _pruner(self):
        import optuna
        p = self.space.pruning
        if p is None:
            return optuna.pruners.NopPruner()
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_epochs,
                                           interval_steps=1)

    def _sampler(self, seed: int):
        import optuna
        s = self.space.sampler
        if s.name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=s.startup_trials, constant_liar=True)

    # ------------------------------------------------------------------ trials

    def trials(self, states=None) -> list:
        return self.study.get_trials(deepcopy=False, states=states)

    def started(self) -> int:
        """Trials that were handed out (every state but WAITING: enqueued trials not yet run)."""
        from optuna.trial import TrialState
        return sum(t.state != TrialState.WAITING for t in self.trials())

    def running(self) -> list:
        from optuna.trial import TrialState
        return sorted(self.trials(states=(TrialState.RUNNING,)), key=lambda t: t.number)

    def ask(self):
        """The next trial. The sampler is re-seeded from the number of trials so far, so a sweep continued after its
        driver was killed draws the same parameters as one that never stopped (a seeded sampler kept across asks
        would restart its random stream with every driver)."""
        self.study.sampler = self._sampler(self.space.sampler.seed + len(self.trials()))
        return self.study.ask(self.distributions)

    def reattach(self, frozen):
        """A Trial object (report, should_prune) for a RUNNING trial, possibly created by an earlier driver."""
        import optuna
        return optuna.trial.Trial(self.study, frozen._trial_id)

    def complete(self, trial, value: float):
        from optuna.trial import TrialState
        return self.study.tell(int(trial.number), float(value), state=TrialState.COMPLETE)

    def prune(self, trial):
        from optuna.trial import TrialState
        return self.study.tell(int(trial.number), state=TrialState.PRUNED)

    def fail(self, trial):
        from optuna.trial import TrialState
        return self.study.tell(int(trial.number), state=TrialState.FAIL)


def _optuna_params(space: Space, entry: dict) -> dict:
    from hvdtrain.sweep.space import encode_choice
    return {k: encode_choice(v) if space.params[k].kind == "choice" else v for k, v in entry.items()}


def _difference(old, new, path: str = "") -> str:
    """The first place two settings trees differ, for the message."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            if old.get(key) != new.get(key):
                return _difference(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
    return f"{path}: {json.dumps(old)} then, {json.dumps(new)} now"
