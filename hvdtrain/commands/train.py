"""Train on every rank. How the ranks share the work:
  data parallelism (the default)   every rank a replica of the model, the gradients averaged at every step
  pipeline stages                  --parallel.pipeline_stages=P: the model cut into P stages, micro-batches flowing
                                   through them (GPipe or 1F1B); the ranks are ranks/P replicas of the pipeline (MPI)
  local SGD                        --trainer.sync=local_sgd: each rank takes trainer.sync_period steps on its own,
                                   then the weights are averaged (fewer bytes sent)
  federated averaging              --trainer.sync=fedavg: simulated clients (fedavg.*, data.partition), a round per
                                   epoch, their weights averaged by their numbers of examples
The run directory (trainer.run_dir) receives config.yaml, checkpoints/, metrics.csv, tensorboard/, model.keras and
summary.json (and classes.json for image classes). A run directory that already holds a checkpoint is resumed (see
--resume/--no-resume). Stop it gracefully with SIGUSR1/SIGTERM or by creating RUN_DIR/STOP: all ranks stop at one
agreed step, a checkpoint is written there, and STOP is removed (served)."""
from __future__ import annotations

HELP = "train a model (run under horovodrun, mpirun or srun)"


def add_arguments(parser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config (default: built-in defaults, the digits job)")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", dest="resume", action="store_const", const="always",
                        help="require a checkpoint in the run directory and continue from it")
    resume.add_argument("--no-resume", dest="resume", action="store_const", const="never",
                        help="refuse to start if the run directory already holds a checkpoint")
    parser.add_argument("--elastic", action="store_true",
                        help="Horovod Elastic (same as --trainer.elastic=true): launch with horovodrun --gloo --min-np 1 "
                             "--max-np N --host-discovery-script scripts/discover-hosts.sh")


def run(args, overrides) -> int:
    from pathlib import Path

    from hvdtrain.config import load_config
    from hvdtrain.runtime import import_tensorflow
    if args.resume:
        overrides = [*overrides, f"--trainer.resume={args.resume}"]
    if args.elastic:
        overrides = [*overrides, "--trainer.elastic=true"]
    cfg = load_config(args.config, overrides)   # a config mistake is said before TensorFlow loads (seconds)
    import_tensorflow()
    from hvdtrain.loop.stop import StopRequest
    from hvdtrain.rundir import STOP_FILE
    from hvdtrain.trainer import Trainer
    Trainer(cfg, stop=StopRequest(stop_file=Path(cfg.trainer.run_dir) / STOP_FILE).install()).fit()
    return 0
