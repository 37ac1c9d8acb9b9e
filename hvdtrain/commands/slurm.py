"""Submit a training job to Slurm without editing scripts.

  hvdtrain slurm submit --nodes 2 --gpus-per-node 4 --time 2:00:00 --partition gpu --config my.yaml --trainer.epochs=10
  hvdtrain slurm render ...same options...     # print the sbatch command instead of running it

Both run the repository's slurm/train.sbatch (one rank per GPU, srun --mpi=pmix, preemption-safe) with sbatch
options for your values; config overrides (--section.key=value) are passed on to `hvdtrain train`. Everything is
checked before anything reaches Slurm: value formats, the config and overrides, the global batch against the number
of ranks, and (submit) the partition's node count and time limit, so a job that could never run is refused at once
instead of pending forever. render prints one shell-quoted line: paths with spaces or `$` stay single arguments.
"""
from __future__ import annotations

from hvdtrain import slurm_jobs as jobs

HELP = "submit training to Slurm (or print the sbatch command): nodes, GPUs per node, time, partition, config"


def add_arguments(p) -> None:
    p.add_argument("action", choices=("submit", "render"), help="submit: run sbatch; render: print the command")
    p.add_argument("--config", metavar="FILE", help="YAML config for `hvdtrain train` (default: built-in defaults)")
    jobs.add_job_arguments(p)
    p.add_argument("--job-name", type=jobs.slurm_name("--job-name"), default="hvdtrain-train", metavar="NAME")
    p.add_argument("--output", metavar="PATTERN", help="job log (default NAME-JOBID.out in this directory; %%j is "
                                                         "the job id); a requeued run appends to it")


def run(args, overrides) -> int:
    command, env = jobs.build_command(args, overrides)
    if args.action == "render":
        print(jobs.render(command, env))
        return 0
    jobs.check_partition(args)
    return jobs.submit(command, env, args)
