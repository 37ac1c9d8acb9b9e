"""`hvdtrain` console entry point. Each subcommand runs inside every rank when started by a launcher."""
from __future__ import annotations

import argparse
import importlib
import sys

from hvdtrain import runtime
from hvdtrain.errors import UserError

# Subcommands that live in their own module: name -> module with HELP, add_arguments(parser), run(args, overrides) -> int.
# Those modules must import TensorFlow/Horovod lazily (inside run), so `hvdtrain --help` stays fast.
PLUGGED_COMMANDS: dict[str, str] = {
    "bench": "hvdtrain.bench",
    "predict": "hvdtrain.predict_command",
    "evaluate": "hvdtrain.evaluate_command",
    "slurm": "hvdtrain.slurm",
}

EPILOG_OVERRIDES = ("Any config key can be overridden after the options as --section.key=value, e.g.\n"
                    "  --trainer.epochs=5 --optim.lr=0.1 --data.input_shape=[32,32,3]\n"
                    "`hvdtrain config --reference` lists every key with its default and meaning.")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hvdtrain", description="Data-parallel Keras training on Horovod. "
                                "Launch one process per rank: horovodrun -np 2 hvdtrain train --config configs/digits.yaml",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train a model (run under horovodrun, mpirun or srun)", epilog=EPILOG_OVERRIDES,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Train on every rank. The run directory (trainer.run_dir) receives config.yaml, "
                                       "checkpoints/, metrics.csv, tensorboard/, model.keras and summary.json. A run "
                                       "directory that already holds a checkpoint is resumed (see --resume/--no-resume).")
    train.add_argument("--config", metavar="FILE", help="YAML config (default: built-in defaults, the digits job)")
    resume = train.add_mutually_exclusive_group()
    resume.add_argument("--resume", dest="resume", action="store_const", const="always",
                        help="require a checkpoint in the run directory and continue from it")
    resume.add_argument("--no-resume", dest="resume", action="store_const", const="never",
                        help="refuse to start if the run directory already holds a checkpoint")
    train.add_argument("--elastic", action="store_true",
                       help="Horovod Elastic (same as --trainer.elastic=true): launch with horovodrun --gloo --min-np 1 "
                            "--max-np N --host-discovery-script scripts/discover-hosts.sh")

    cfg = sub.add_parser("config", help="print the resolved config (defaults <- file <- overrides)", epilog=EPILOG_OVERRIDES,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    cfg.add_argument("--config", metavar="FILE")
    cfg.add_argument("--reference", action="store_true", help="list every key, its default and what it does")

    doctor = sub.add_parser("doctor", help="check the installation: versions, Horovod build, MPI, ranks and hosts",
                            description="Prints TensorFlow/Keras/Horovod versions, the controllers and tensor operations "
                                        "Horovod was built with, the MPI library, the communication settings, and (under a "
                                        "launcher) the ranks and hosts. Exits non-zero with advice when the setup is broken.")
    doctor.add_argument("--config", metavar="FILE", help="show the communication settings this config would apply")

    for name, module_path in PLUGGED_COMMANDS.items():
        module = importlib.import_module(module_path)
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.__doc__,
                                            formatter_class=argparse.RawDescriptionHelpFormatter))
    return p


def main(argv=None) -> int:
    runtime.quiet_tensorflow()
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--") and "=" in a and "." in a.split("=", 1)[0]]
    unknown = [a for a in rest if a not in overrides]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)} (config overrides look like --trainer.epochs=5)")
    try:
        if args.command in PLUGGED_COMMANDS:
            return importlib.import_module(PLUGGED_COMMANDS[args.command]).run(args, overrides)
        return _COMMANDS[args.command](args, overrides)
    except UserError as exc:
        from hvdtrain.dist import rank_hint
        # An agreed error is the same on every rank: rank 0 prints it once. A local one is printed where it happened.
        if rank_hint() == 0 or not getattr(exc, "agreed", False):
            print(f"hvdtrain: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code


def _train(args, overrides) -> int:
    from hvdtrain.callbacks import StopRequest
    from hvdtrain.config import load_config
    from hvdtrain.trainer import Trainer
    if args.resume:
        overrides = [*overrides, f"--trainer.resume={args.resume}"]
    if args.elastic:
        overrides = [*overrides, "--trainer.elastic=true"]
    try:
        cfg = load_config(args.config, overrides)
    except UserError as exc:
        exc.agreed = True  # every rank reads the same file and arguments: rank 0 alone reports it
        raise
    Trainer(cfg, stop=StopRequest().install()).fit()
    return 0


def _config(args, overrides) -> int:
    from hvdtrain.config import describe_fields, load_config
    if args.reference:
        for key, default, doc in describe_fields():
            print(f"{key:34} {default:16} {doc}")
        return 0
    print(load_config(args.config, overrides).to_yaml(), end="")
    return 0


def _doctor(args, overrides) -> int:
    from hvdtrain.doctor import run
    return run(args.config, overrides)


_COMMANDS = {"train": _train, "config": _config, "doctor": _doctor}


if __name__ == "__main__":
    sys.exit(main())
