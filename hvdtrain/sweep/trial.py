"""One trial's run directory, DIR/trials/NNNN, as the driver reads and writes it.

`hvdtrain train` writes config.yaml, checkpoints/, metrics.csv (one row per epoch, appended by every resumed run) and
summary.json there; the driver adds train.log (the trial's output; on Slurm slurm-JOBID.out), trial.pid and
trial.exit (local trials: the launcher's process group and exit code) and, to stop the trial at an agreed step,
trial.stop, the driver's record of why: "pruned ..." (the trial is over) or "paused ..." (the sweep was interrupted;
the trial continues from its checkpoint when the sweep does), and STOP, the request to the trainer, which removes it
once the stop's checkpoint is written.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from hvdtrain.rundir import STOP_FILE, write_atomic

PRUNED, PAUSED = "pruned", "paused"


class MetricMissing(Exception):
    """metrics.csv has rows but not the column the pruner reads."""


class TrialDir:
    def __init__(self, out: Path, number: int):
        self.number = number
        self.path = out / "trials" / f"{number:04d}"

    def __str__(self) -> str:
        return str(self.path)

    @property
    def log(self) -> Path:
        return self.path / "train.log"

    @property
    def pid_file(self) -> Path:
        return self.path / "trial.pid"

    @property
    def exit_file(self) -> Path:
        return self.path / "trial.exit"

    @property
    def stop_file(self) -> Path:
        return self.path / STOP_FILE

    @property
    def decision_file(self) -> Path:
        return self.path / "trial.stop"

    def prepare(self) -> None:
        """Before a launch: the directory exists, and no pid or exit code of an earlier launch is left to be misread."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.exit_file.unlink(missing_ok=True)
        self.pid_file.unlink(missing_ok=True)

    # ------------------------------------------------------------------ what the trainer wrote

    def summary(self) -> dict | None:
        try:
            return json.loads((self.path / "summary.json").read_text())
        except (OSError, ValueError):
            return None

    def epoch_values(self, metric: str) -> dict[int, float]:
        """{epoch (1-based): value} for every epoch that has finished, from metrics.csv as it grows.

        Only whole lines count (the file may be caught mid-write). A run stopped mid-epoch leaves a partial row and
        its resumed run another for the rest of that epoch; an epoch's value is that of its last row once the epoch
        is over: the row is not partial, or a later epoch has begun."""
        try:
            text = (self.path / "metrics.csv").read_text()
        except OSError:
            return {}
        lines = text.split("\n")[:-1]   # the part after the last newline is not a whole line yet
        if len(lines) < 2:
            return {}
        reader = csv.DictReader(io.StringIO("\n".join(lines) + "\n"))
        if metric not in (reader.fieldnames or []):
            raise MetricMissing(f"metrics.csv of trial {self.number} has no column {metric} "
                                f"(it has {', '.join(reader.fieldnames or [])})")
        last: dict[int, dict] = {}
        for row in reader:
            try:
                last[int(row["epoch"])] = row
            except (KeyError, ValueError):
                continue
        values = {}
        newest = max(last, default=-1)
        for epoch, row in last.items():
            if row.get("partial", "0") in ("0", "0.0", "") or epoch < newest:
                try:
                    value = float(row[metric])
                except (TypeError, ValueError):
                    continue
                if math.isfinite(value):
                    values[epoch + 1] = value
        return values

    # ------------------------------------------------------------------ STOP

    def stop_reason(self) -> str | None:
        """pruned | paused | None: the driver's record, else a STOP not served yet (a sweep of an earlier version).
        A STOP without the driver's text counts as a pause."""
        for path in (self.decision_file, self.stop_file):
            try:
                text = path.read_text()
            except OSError:
                continue
            return PRUNED if text.startswith(PRUNED) else PAUSED
        return None

    def request_stop(self, reason: str, detail: str) -> None:
        """Every rank of the trial stops at one agreed step, a checkpoint is written there, and the trainer exits 0
        (hvdtrain's StopAgreement watches run_dir/STOP and removes it once served; the record stays in trial.stop)."""
        self.path.mkdir(parents=True, exist_ok=True)
        text = f"{reason} by hvdtrain sweep: {detail}\n"
        write_atomic(self.decision_file, text)   # first: the decision holds even if the driver dies right here
        write_atomic(self.stop_file, text)

    def clear_pause(self) -> None:
        if self.stop_reason() == PAUSED:
            self.decision_file.unlink(missing_ok=True)
            self.stop_file.unlink(missing_ok=True)

    def error_line(self) -> str:
        """The trainer's `hvdtrain: error: ...` line from the trial's log, if any."""
        for log in [self.log, *sorted(self.path.glob("slurm-*.out"))]:
            try:
                lines = log.read_text(errors="replace").splitlines()
            except OSError:
                continue
            found = [line.split("hvdtrain: error: ", 1)[1] for line in lines if "hvdtrain: error: " in line]
            if found:
                return found[-1].strip()
        return ""

    def logs(self) -> str:
        logs = [p for p in [self.log, *sorted(self.path.glob("slurm-*.out"))] if p.exists()]
        return ", ".join(str(p) for p in logs) or str(self.path)
