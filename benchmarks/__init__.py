"""Benchmarks that print a table and write JSON + a PNG plot (docs/benchmarks.md is made from them by `make bench`).

  hvdtrain bench allreduce --output bench/allreduce.json   all-reduce latency/bandwidth vs raw MPI_Allreduce
  hvdtrain bench train     --output bench/train.json       throughput, weak scaling, vs MultiWorkerMirroredStrategy
  hvdtrain bench predict   --output bench/predict.json     data-parallel inference throughput
  hvdtrain bench tune      --output bench/tuning.json      the evidence behind the communication defaults
  hvdtrain bench report    --dir bench --output docs/benchmarks.md   the Markdown report from those files

Started without a launcher, allreduce and train launch their own ranks (horovodrun, TF_CONFIG workers);
config overrides (--runtime.cycle_time_ms=0.2 ...) and HOROVOD_* variables reach every rank.
"""
from __future__ import annotations

import argparse
import importlib

HELP = "benchmarks: all-reduce, training throughput and scaling, inference (JSON + PNG + table)"

# Sub-command name -> module in this package with HELP, add_arguments(parser) and run(args) -> int.
# A module that is not there (yet) is simply not offered. (harness.py is what they share.)
SUBCOMMANDS = {"allreduce": "allreduce", "train": "train", "predict": "predict", "tune": "tune", "report": "report"}


def _modules() -> dict:
    found = {}
    for name, module in SUBCOMMANDS.items():
        try:
            found[name] = importlib.import_module(f"benchmarks.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"benchmarks.{module}":
                raise  # the module exists but something it imports is missing: that is a real error
    return found


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    for name, module in _modules().items():
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.__doc__,
                                            formatter_class=argparse.RawDescriptionHelpFormatter))


def run(args, overrides) -> int:
    args.overrides = list(overrides)   # sub-commands read config overrides from args
    return _modules()[args.bench_command].run(args)
