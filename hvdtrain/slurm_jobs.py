"""Slurm jobs of `hvdtrain train`: the sbatch command for slurm/train.sbatch with every value checked first (formats,
the config and overrides, the global batch against the ranks, the partition's nodes and time limit), submission
through the Slurm clients with their errors as one line. `hvdtrain slurm` and `hvdtrain sweep --slurm` both build
their jobs here.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from hvdtrain.errors import UserError

TEMPLATES = Path(__file__).resolve().parents[1] / "slurm"
JOB_SCRIPT = "train.sbatch"
# Slurm names (partition, account, QOS, job name): letters, digits and a few separators.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def add_job_arguments(p) -> None:
    """The options that shape one training job: also those of `hvdtrain sweep --slurm` for each trial's job."""
    p.add_argument("--nodes", type=positive_int("--nodes"), default=1, metavar="N", help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=count_int("--gpus-per-node"), default=0, metavar="G",
                   help="GPUs per node = ranks per node (default 0: CPU nodes, see --tasks-per-node)")
    p.add_argument("--tasks-per-node", type=positive_int("--tasks-per-node"), metavar="T",
                   help="ranks per node on CPU nodes (default 1; with GPUs it equals --gpus-per-node)")
    p.add_argument("--gpu-request", choices=("gres", "gpus-per-task"), default="gres",
                   help="how GPUs are requested: --gres=gpu:G per node (default) or --gpus-per-task=1")
    p.add_argument("--cpus-per-task", type=positive_int("--cpus-per-task"), metavar="C", help="cores per rank")
    p.add_argument("--time", metavar="LIMIT", help="time limit: MINUTES, H:MM:SS or D-HH[:MM[:SS]]")
    p.add_argument("--partition", type=slurm_name("--partition"), metavar="P")
    p.add_argument("--account", type=slurm_name("--account"), metavar="A")
    p.add_argument("--qos", type=slurm_name("--qos"), metavar="Q")
    p.add_argument("--stop-notice", type=count_int("--stop-notice"), default=180, metavar="SECONDS",
                   help="USR1 this long before the time limit: stop, checkpoint, requeue (default 180)")
    p.add_argument("--launcher", choices=("srun", "mpirun"), default="srun",
                   help="srun --mpi=pmix (default) or mpirun with a host list (sites without PMIx)")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="any other sbatch option, e.g. --sbatch=--constraint=a100 (repeatable)")


# ------------------------------------------------------------------ the command

def build_command(args, overrides) -> tuple[list[str], dict[str, str]]:
    """The sbatch argv and the environment variables it needs, after validating everything locally."""
    tasks = _tasks_per_node(args)
    time_limit = _check_time(args)
    config = _check_config(args.config, overrides, args.nodes * tasks)
    options = [f"--nodes={args.nodes}", f"--ntasks-per-node={tasks}", f"--job-name={args.job_name}",
               f"--signal=B:USR1@{args.stop_notice}", "--requeue", "--open-mode=append"]
    if args.gpus_per_node:
        options.append(f"--gres=gpu:{args.gpus_per_node}" if args.gpu_request == "gres" else "--gpus-per-task=1")
    for flag, value in (("cpus-per-task", args.cpus_per_task), ("time", time_limit), ("partition", args.partition),
                        ("account", args.account), ("qos", args.qos), ("output", args.output)):
        if value is not None:
            options.append(f"--{flag}={value}")
    script = TEMPLATES / JOB_SCRIPT
    if not script.is_file():
        raise UserError(f"{script} not found; hvdtrain slurm needs the repository checkout (pip install -e .)")
    train_args = (["--config", config] if config else []) + list(overrides)
    return ["sbatch", *options, *args.sbatch, str(script), *train_args], _job_environment(args.launcher)


def _job_environment(launcher: str) -> dict[str, str]:
    """What the batch script needs to find hvdtrain and slurm/common.sh on the compute nodes."""
    env = {"HVDTRAIN_SLURM_DIR": str(TEMPLATES)}
    if sys.prefix != sys.base_prefix:   # running from a virtualenv: the job uses the same one
        env["HVDTRAIN_VENV"] = sys.prefix
    if launcher != "srun":
        env["HVDTRAIN_LAUNCHER"] = launcher
    return env


def render(command: list[str], env: dict[str, str]) -> str:
    """One line for a POSIX shell; every word quoted, so no value can split or expand."""
    return " ".join([f"{k}={shlex.quote(v)}" for k, v in env.items()] + [shlex.join(command)])


def _tasks_per_node(args) -> int:
    if args.gpus_per_node and args.tasks_per_node not in (None, args.gpus_per_node):
        raise UserError(f"--tasks-per-node {args.tasks_per_node} differs from --gpus-per-node {args.gpus_per_node}; "
                        "hvdtrain runs one rank per GPU (drop --tasks-per-node)")
    return args.gpus_per_node or args.tasks_per_node or 1


def _check_time(args) -> str | None:
    if args.time is None:
        return None
    seconds = time_seconds(args.time, "--time")
    if seconds <= args.stop_notice:
        raise UserError(f"--time {args.time} is not longer than --stop-notice {args.stop_notice} s; the job would be "
                        "told to stop as soon as it starts")
    return args.time


def _check_config(path: str | None, overrides, ranks: int) -> str | None:
    """Load the config as the job will, so its mistakes are reported here and not in a job log."""
    from hvdtrain.config import check_world, load_config
    cfg = load_config(path, overrides)
    check_world(cfg, ranks)
    if cfg.trainer.resume == "never":
        raise UserError("trainer.resume=never: a requeued job (preemption, time limit) could not resume; "
                        "use a fresh --trainer.run_dir instead")
    return str(Path(path).resolve()) if path else None


# ------------------------------------------------------------------ Slurm

def time_seconds(text: str, what: str) -> int:
    """Slurm's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+(?::\d+){0,2})", text.strip())
    if not match:
        raise UserError(f"{what} must be MINUTES, H:MM:SS or D-HH[:MM[:SS]], got {text!r}")
    days, parts = match.group(1), [int(p) for p in match.group(2).split(":")]
    if days is not None:
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    else:
        hours, minutes, seconds = 0, parts[0], (parts[1] if len(parts) == 2 else 0)
    if any(p >= 60 for p in parts[1:]):
        raise UserError(f"{what} {text!r}: minutes and seconds must be below 60")
    total = ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise UserError(f"{what} must be longer than zero, got {text!r}")
    return total


def check_partition(args) -> None:
    """Refuse requests the partition can never run: Slurm would otherwise leave them pending forever when the site
    does not set EnforcePartLimits."""
    info = _partition(args.partition)
    name = info["PartitionName"]
    if info.get("TotalNodes", "").isdigit() and args.nodes > int(info["TotalNodes"]):
        raise UserError(f"partition {name} has {info['TotalNodes']} node(s), {args.nodes} requested")
    max_time = info.get("MaxTime", "UNLIMITED")
    if args.time and max_time not in ("UNLIMITED", "INFINITE") and \
            time_seconds(args.time, "--time") > time_seconds(max_time, "MaxTime"):
        raise UserError(f"--time {args.time} exceeds the time limit of partition {name} ({max_time})")


def _partition(name: str | None) -> dict[str, str]:
    out = client(["scontrol", "show", "partition", "--oneliner"])
    parts = [dict(tok.split("=", 1) for tok in line.split() if "=" in tok) for line in out.splitlines() if line.strip()]
    chosen = [p for p in parts if p.get("PartitionName") == name] if name else [p for p in parts if p.get("Default") == "YES"]
    if not chosen:
        raise UserError(f"partition {name!r} does not exist (sinfo -s lists them)" if name else
                        "the cluster has no default partition; choose one with --partition (sinfo -s lists them)")
    return chosen[0]


def submit(command: list[str], env: dict[str, str], args) -> int:
    out = client([command[0], "--parsable", *command[1:]], env)
    job_id = out.strip().split(";")[0]
    log = (args.output or "%x-%j.out").replace("%j", job_id).replace("%x", args.job_name)
    print(f"submitted job {job_id}: {args.nodes} node(s); log {Path(log).resolve()}\n"
          f"  follow: tail -f {shlex.quote(str(Path(log).resolve()))}   state: scontrol show job {job_id}")
    return 0


def client(argv: list[str], extra_env: dict[str, str] | None = None) -> str:
    """Run a Slurm client (sbatch, scontrol, ...) and return its output; its error becomes one line."""
    if shutil.which(argv[0]) is None:
        raise UserError(f"{argv[0]} not found: run this on a Slurm login node (or start scripts/slurm-local.sh up)")
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(extra_env or {})})
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()] or [f"exit code {proc.returncode}"]
        reason = lines[-1].replace(f"{argv[0]}: error: ", "").replace("Batch job submission failed: ", "")
        raise UserError(f"{argv[0]} refused: {reason}")
    return proc.stdout


# ------------------------------------------------------------------ argument types

def positive_int(flag):
    return lambda text: _int(flag, text, 1)


def count_int(flag):
    return lambda text: _int(flag, text, 0)


def _int(flag: str, text: str, minimum: int) -> int:
    if not re.fullmatch(r"\d+", text) or int(text) < minimum:
        raise argparse.ArgumentTypeError(f"{flag} must be an integer >= {minimum}, got {text!r}")
    return int(text)


def slurm_name(flag):
    def check(text: str) -> str:
        if not NAME.fullmatch(text):
            raise argparse.ArgumentTypeError(f"{flag} must be a Slurm name (letters, digits, _ . + -), got {text!r}")
        return text
    return check
