"""Trials on this machine: each is `horovodrun -np K hvdtrain train ...` (one plain process for K = 1) from the
virtualenv of the running interpreter, started in a session of its own.

A small shell wrapper leads that session: it writes its pid to RUN/trial.pid, runs the launcher with its output in
RUN/train.log, and writes the launcher's exit code to RUN/trial.exit. So a trial outlives its driver (SIGKILL, a
lost terminal), and a later driver can tell, by process id, whether it still runs (some process of that session
is alive and belongs to this run directory: it follows it), ended (trial.exit: it reads the code), or vanished
without an exit code (a reboot, a killed launcher: it launches the trial again, which resumes from its checkpoint).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from hvdtrain.errors import UserError
from hvdtrain.sweep.trial import TrialDir

BIN = Path(sys.executable).parent
# $1: path prefix of trial.pid / trial.exit; the rest: the launcher's argv.
WRAPPER = ('p="$1"; shift; echo $$ > "$p.pid.tmp" && mv -f "$p.pid.tmp" "$p.pid"; "$@"; rc=$?; '
           'echo $rc > "$p.exit.tmp" && mv -f "$p.exit.tmp" "$p.exit"; exit $rc')
RUNNING, EXITED, LOST = "running", "exited", "lost"


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def session_alive(sid: int, needle: str) -> bool:
    """Whether a live process of session `sid` runs this trial: one of its processes names the run directory on its
    command line (guards against a recycled process id)."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            members.append(entry.name)
    for pid in members:
        try:
            if needle.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


class LocalRunner:
    kind = "local"
    logs = "train.log"

    def __init__(self, ranks: int, slots: int, parallel: int, cwd: Path):
        self.ranks, self.slots, self.parallel, self.cwd = ranks, slots, parallel, cwd
        self.children: dict[int, subprocess.Popen] = {}
        self.host, self.boot = socket.gethostname(), boot_id()
        if ranks > 1 and not (BIN / "horovodrun").exists():
            raise UserError(f"horovodrun not found in {BIN}: trials of {ranks} ranks need Horovod in this virtualenv "
                            "(scripts/install.sh)", agreed=True)

    def describe(self) -> str:
        return f"locally, {self.ranks} rank(s) per trial, {self.parallel} at a time"

    def extra_overrides(self, base) -> list[str]:
        """Side by side, trials share the cores: give each rank its share unless the config sets the threads."""
        if self.parallel > 1 and base.runtime.intra_op_threads == 0:
            return [f"--runtime.intra_op_threads={max(1, self.slots // (self.parallel * self.ranks))}"]
        return []

    def command(self, train_args: list[str]) -> list[str]:
        train = [str(BIN / "hvdtrain"), "train", *train_args]
        if self.ranks == 1:
            return train
        from hvdtrain.backend.environment import launch_controller
        controller = launch_controller()
        return [str(BIN / "horovodrun"), "-np", str(self.ranks), f"--{controller}", *train]

    @staticmethod
    def environment() -> dict:
        env = dict(os.environ)
        env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        env["PYTHONUNBUFFERED"] = "1"
        if os.geteuid() == 0:   # OpenMPI refuses root unless told (containers, CI)
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        return env

    def launch(self, trial: TrialDir, train_args: list[str]) -> dict:
        trial.prepare()
        argv = ["/bin/sh", "-c", WRAPPER, "hvdtrain-trial", str(trial.path / "trial"), *self.command(train_args)]
        with open(trial.log, "ab") as log:
            log.write(f"[sweep] trial {trial.number}: {' '.join(argv[4:])}\n".encode())
            log.flush()
            proc = subprocess.Popen(argv, cwd=self.cwd, env=self.environment(), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.children[trial.number] = proc
        return {"host": self.host, "boot_id": self.boot, "sid": proc.pid}

    def where(self, record: dict) -> str:
        return f"pid {record.get('sid', '?')}"

    def state(self, trial: TrialDir, record: dict) -> tuple[str, int | None]:
        """(running | exited | lost, exit code)."""
        child = self.children.get(trial.number)
        if child is not None and child.poll() is not None:
            del self.children[trial.number]   # reaped; its session may still hold the launcher's children
        sid = record.get("sid") or _read_int(trial.pid_file)
        if record.get("host", self.host) != self.host:
            raise UserError(f"trial {trial.number} was started on host {record['host']} by a sweep driver there; "
                            f"rerun the sweep on {record['host']} (its processes cannot be seen from here)")
        same_boot = record.get("boot_id", self.boot) == self.boot
        if sid and same_boot and session_alive(sid, str(trial.path)):
            return RUNNING, None
        code = _read_int(trial.exit_file)   # written before the wrapper exits: read after the liveness check
        return (EXITED, code) if code is not None else (LOST, None)

    def forget(self, number: int) -> None:
        self.children.pop(number, None)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None
