"""Trials on Slurm: each trial is one job of the repository's slurm/train.sbatch, submitted exactly as
`hvdtrain slurm submit` would (same checks, same sbatch options, same environment), with its log in
RUN/slurm-JOBID.out and the job name PREFIX-tNNNN.

The job is preemption-safe by itself: on USR1 (time limit, `scancel --signal=USR1 --batch`) its ranks stop at an
agreed step, checkpoint, and the job requeues itself under the same id and resumes from that checkpoint; the driver
just keeps following the id. The driver only reads Slurm (scontrol) and the run directory, so it can be stopped and
rerun at any time while the jobs go on.
"""
from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

from hvdtrain import slurm_jobs as jobs
from hvdtrain.errors import UserError
from hvdtrain.sweep.local import EXITED, LOST, RUNNING
from hvdtrain.sweep.trial import TrialDir

FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED")
CANCELLED = -1   # the exit "code" of a job cancelled with scancel: the trial fails, it is not run again


def add_arguments(group) -> None:
    """The options of `hvdtrain slurm submit` that shape one trial's job (the same ones), and the job-name prefix."""
    jobs.add_job_arguments(group)
    group.add_argument("--job-name", type=jobs.slurm_name("--job-name"), metavar="PREFIX",
                       help="job names are PREFIX-tNNNN (default: sweep-<name of DIR>)")


def ranks(args) -> int:
    return args.nodes * (args.gpus_per_node or args.tasks_per_node or 1)


class SlurmRunner:
    kind = "slurm"

    def __init__(self, args, out: Path, parallel: int, cwd: Path):
        self.args, self.out, self.parallel, self.cwd = args, out, parallel, cwd
        self.prefix = args.job_name or "sweep-" + (re.sub(r"[^A-Za-z0-9_.+-]", "-", out.name).strip("-") or "dir")
        self.ranks = ranks(args)

    logs = "slurm-JOBID.out"

    def describe(self) -> str:
        return f"on Slurm, {self.ranks} rank(s) per trial ({self.args.nodes} node(s)), up to {self.parallel} job(s) at a time"

    def check(self, base_config: Path, overrides: list[str]) -> None:
        """Everything `hvdtrain slurm submit` checks, once, before any trial: the job options (with one point of the
        space, so the job's config is the one checked) and the partition."""
        jobs.build_command(self._job_args(base_config, "check", "slurm-%j.out"), overrides)
        jobs.check_partition(self.args)

    def extra_overrides(self, base) -> list[str]:
        return []

    def _job_args(self, config: Path, name: str, output: str) -> argparse.Namespace:
        a = self.args
        return argparse.Namespace(
            action="submit", config=str(config), nodes=a.nodes, gpus_per_node=a.gpus_per_node,
            tasks_per_node=a.tasks_per_node, gpu_request=a.gpu_request, cpus_per_task=a.cpus_per_task, time=a.time,
            partition=a.partition, account=a.account, qos=a.qos, job_name=name, output=output,
            stop_notice=a.stop_notice, launcher=a.launcher, sbatch=[*a.sbatch, f"--chdir={self.cwd}"])

    def job_name(self, number: int) -> str:
        return f"{self.prefix}-t{number:04d}"

    def launch(self, trial: TrialDir, train_args: list[str]) -> dict:
        """`sbatch train.sbatch --config BASE overrides...` for one trial; returns its job id."""
        trial.prepare()
        config, overrides = train_args[1], train_args[2:]   # train_args = ["--config", BASE, overrides...]
        command, env = jobs.build_command(
            self._job_args(Path(config), self.job_name(trial.number), str(trial.path / "slurm-%j.out")), overrides)
        out = jobs.client([command[0], "--parsable", *command[1:]], env)
        job_id = out.strip().split(";")[0]
        if not job_id.isdigit():
            raise UserError(f"sbatch printed no job id for trial {trial.number}: {out.strip()!r}")
        return {"job_id": job_id}

    def where(self, record: dict) -> str:
        return f"job {record.get('job_id', '?')}"

    def find(self, number: int) -> dict | None:
        """A job of this trial submitted by a driver that died before it could record the id (by job name)."""
        out = subprocess.run(["squeue", "--noheader", "--format=%i", f"--name={self.job_name(number)}"],
                             capture_output=True, text=True, cwd=self.cwd)
        ids = sorted(int(x) for x in out.stdout.split() if x.isdigit())
        return {"job_id": str(ids[-1])} if ids else None

    def state(self, trial: TrialDir, record: dict) -> tuple[str, int | None]:
        job_id = record.get("job_id")
        if not job_id:
            found = self.find(trial.number)
            if not found:
                return LOST, None
            record.update(found)
            job_id = found["job_id"]
        proc = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True)
        info = dict(tok.split("=", 1) for tok in proc.stdout.split() if "=" in tok) if proc.returncode == 0 else {}
        state = info.get("JobState")
        if state is None:
            # Slurm has forgotten the job (MinJobAge): the run directory tells whether it finished.
            summary = trial.summary() or {}
            return (EXITED, 0) if summary.get("status") == "completed" else (LOST, None)
        if state not in FINAL:
            return RUNNING, None
        if state == "CANCELLED":
            return EXITED, CANCELLED
        if state in ("COMPLETED", "FAILED"):
            rc, _, sig = info.get("ExitCode", "1:0").partition(":")
            code = int(rc) if rc.isdigit() else 1
            return EXITED, code if code or not sig.isdigit() or sig == "0" else 128 + int(sig)
        return LOST, None   # timeout, node failure, preempted without requeue, ...: submit again, it resumes

    def forget(self, number: int) -> None:
        pass
