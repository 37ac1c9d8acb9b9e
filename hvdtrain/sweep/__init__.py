"""`hvdtrain sweep`: a hyperparameter search whose trials are ordinary data-parallel `hvdtrain train` runs.

  space.py    SPACE.yaml: keys and ranges, objective, pruning, sampler; checked against the base config
  study.py    the Optuna study in DIR/study.journal (survives the driver), the one-driver-per-DIR lock
  trial.py    one trial's run directory: metrics.csv as it grows, summary.json, trial.stop (pruned | paused) and STOP
  local.py    trials as `horovodrun -np K hvdtrain train` in sessions of their own (followed by process id)
  slurm.py    trials as jobs of slurm/train.sbatch (followed by job id; requeued jobs resume by themselves)
  driver.py   the loop: recover, ask, launch, report epochs to the pruner, tell outcomes
  results.py  trials.csv, sweep.png, best.yaml

Nothing here imports TensorFlow or Horovod: the driver only starts processes and reads files.
"""
