"""Hyperparameter search: each trial is an ordinary data-parallel `hvdtrain train` run with its own run directory
DIR/trials/NNNN, locally or as a Slurm job. Optuna samples SPACE.yaml (TPE by default), prunes hopeless trials from
their per-epoch metrics (MedianPruner; the trial stops at an agreed step through RUN/STOP) and keeps the state in
DIR/study.journal, so rerunning the same command after it was killed continues where it stopped: no trial runs twice,
running trials are followed or resumed from their checkpoints.

  hvdtrain sweep --config configs/digits.yaml --space space.yaml --trials 12 --output sweeps/lr --ranks-per-trial 2
  hvdtrain sweep ... --slurm --tasks-per-node 2 --time 30 --parallel 4        # every trial a job of slurm/train.sbatch

SPACE.yaml maps config keys to ranges, and optionally sets the objective, pruning, sampler and enqueued trials:

  optim.lr: {log_uniform: [1.0e-3, 1.0]}
  optim.warmup_epochs: {uniform: [0, 3]}
  trainer.global_batch_size: {choice: [64, 128, 256]}
  objective: {metric: test_accuracy, direction: maximize}     # a key of summary.json
  pruning: {startup_trials: 2, warmup_epochs: 1}             # optional

Results: DIR/trials.csv (one row per trial), DIR/sweep.png, and DIR/best.yaml for `hvdtrain train --config`.
Config overrides after the options apply to every trial (the base config).
"""
from __future__ import annotations

from hvdtrain.commands.common import positive

HELP = "hyperparameter search over `hvdtrain train` trials, locally or on Slurm (Optuna; resumable)"


def add_arguments(parser) -> None:
    parser.add_argument("--config", metavar="BASE.yaml", help="the config every trial starts from (default: built-in defaults)")
    parser.add_argument("--space", metavar="SPACE.yaml", required=True, help="the keys to sweep and their ranges")
    parser.add_argument("--trials", type=positive, required=True, metavar="N",
                        help="trials in the whole sweep (a rerun with a larger N adds trials)")
    parser.add_argument("--output", metavar="DIR", required=True,
                        help="the sweep directory: study.journal, base.yaml, trials/NNNN, trials.csv, sweep.png, best.yaml")
    parser.add_argument("--ranks-per-trial", type=positive, metavar="K",
                        help="ranks of each local trial: horovodrun -np K (default 1; on Slurm: nodes x tasks per node)")
    parser.add_argument("--parallel", type=positive, default=1, metavar="P",
                        help="trials at once (local: P x K ranks must fit the cores; default 1)")
    parser.add_argument("--slots", type=positive, metavar="N", help="local: cores the trials may use (default: this machine's)")
    parser.add_argument("--retries", type=_count, default=2, metavar="R",
                        help="relaunch a trial that crashed up to R times; it resumes from its checkpoint (default 2)")
    group = parser.add_argument_group("Slurm (with --slurm: every trial is a job of slurm/train.sbatch)")
    group.add_argument("--slurm", action="store_true", help="run the trials as Slurm jobs")
    from hvdtrain.sweep import slurm
    slurm.add_arguments(group)


def _count(text: str) -> int:
    import argparse
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return int(text)


def run(args, overrides) -> int:
    from hvdtrain.errors import require
    from hvdtrain.sweep.driver import sweep
    require("optuna", "sweep", "hvdtrain sweep")
    require("matplotlib", "sweep", "hvdtrain sweep's plot")
    require("sklearn", "sweep", "hvdtrain sweep's parameter importances")
    try:
        return sweep(args, overrides)
    except KeyboardInterrupt:   # before the driver's own handler is in place: nothing was started yet
        return 130
