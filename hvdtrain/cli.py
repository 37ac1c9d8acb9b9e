"""`hvdtrain` console entry point: parses the command line and dispatches to hvdtrain/commands/<name>.py.
Each subcommand runs inside every rank when started by a launcher."""
from __future__ import annotations

import argparse
import importlib
import sys

from hvdtrain.commands import COMMANDS
from hvdtrain.commands.common import OVERRIDES_EPILOG
from hvdtrain.errors import UserError

# Commands that run TensorFlow in this process: it is imported first, without its start-up banners. (`train` imports
# it itself once its config is valid, so a typo is reported in a second; `bench` only inside ranks: its drivers
# start subprocesses and never need it.)
RUNS_TENSORFLOW = ("evaluate", "predict", "doctor")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hvdtrain", description="Distributed Keras training on Horovod: data parallelism, "
                                "pipeline stages, local SGD and federated averaging. Launch one process per rank: "
                                "scripts/launch.sh 2 hvdtrain train --config configs/digits.yaml (or horovodrun, "
                                "mpirun, srun)",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_path in COMMANDS.items():
        module = importlib.import_module(module_path)
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.__doc__,
                                            epilog=OVERRIDES_EPILOG,   # every command takes overrides
                                            formatter_class=argparse.RawDescriptionHelpFormatter))
    return p


def main(argv=None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--") and "=" in a and "." in a.split("=", 1)[0]]
    unknown = [a for a in rest if a not in overrides]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)} (config overrides look like --trainer.epochs=5)")
    try:
        if args.command in RUNS_TENSORFLOW:
            from hvdtrain.runtime import import_tensorflow
            import_tensorflow()
        return importlib.import_module(COMMANDS[args.command]).run(args, overrides)
    except UserError as exc:
        from hvdtrain.backend import rank_hint
        # An agreed error is the same on every rank: rank 0 prints it once. A local one is printed where it happened.
        if rank_hint() == 0 or not exc.agreed:
            # One write: print() writes the newline separately, and a launcher that tags output per write (mpirun)
            # then glues its next tag to the end of the line.
            sys.stderr.write(f"hvdtrain: error: {exc}\n")
            sys.stderr.flush()
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
