"""hvdtrain's benchmarks: each prints a table and writes JSON + a PNG plot; `make bench` turns them into
docs/benchmarks.md. `hvdtrain bench` is this package (hvdtrain/commands/bench.py only names it); the plots need
matplotlib, the `[bench]` extra.

  hvdtrain bench allreduce   all-reduce latency/bandwidth vs raw MPI_Allreduce        allreduce.py (+ allreduce_worker)
  hvdtrain bench train       throughput and weak scaling vs plain Horovod and MWMS    train.py (+ train_, horovod_, mwms_worker)
  hvdtrain bench averaging   one group vs buckets vs per tensor vs fp16, exposed comm  averaging.py
  hvdtrain bench stacks      TF 2.21 + hvdtrain's Keras 3 layer vs TF 2.15 + Horovod's  stacks.py
  hvdtrain bench predict     data-parallel inference speed-up                         predict.py
  hvdtrain bench tune        the evidence behind the communication defaults           tune.py
  hvdtrain bench pipeline    pipeline stages: the bubble against its formula, memory   pipeline.py (+ pipeline_worker)
  hvdtrain bench sync        FedAvg vs FedSGD rounds, local SGD accuracy vs bytes      sync.py
  hvdtrain bench serve       online serving: load, latency, replicas, batching on/off  serve.py
  hvdtrain bench tensor      split layers: memory per rank, bytes vs formula, D x T    tensor.py (+ tensor_worker)
  hvdtrain bench memory      sharded optimizer state: bytes, peak memory, step time    memory.py (+ memory_worker)
  hvdtrain bench report      docs/benchmarks.md from those files                      report.py

Drivers (the commands above) run without a launcher and start their own ranks: `python -m hvdtrain.bench.<x>_worker`
under horovodrun. harness.py is what they all share. Config overrides (--runtime.cycle_time_ms=0.2 ...) and
HOROVOD_* variables reach every rank. Under a launcher (e.g. slurm/bench.sbatch) only `bench allreduce` runs: it
then measures that launch.
"""
from __future__ import annotations

import argparse
import importlib

HELP = "benchmarks: all-reduce, training throughput and scaling, stacks, inference (JSON + PNG + table)"

# Sub-command -> module of this package with HELP, add_arguments(parser), run(args) -> int and, if it can also run
# inside the ranks of a launch, run_in_rank(args) -> int.
SUBCOMMANDS = ("allreduce", "train", "averaging", "stacks", "predict", "tune", "pipeline", "sync", "serve", "tensor",
               "memory", "report")


def _module(name: str):
    return importlib.import_module(f"hvdtrain.bench.{name}")


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    for name in SUBCOMMANDS:
        module = _module(name)
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.__doc__,
                                            formatter_class=argparse.RawDescriptionHelpFormatter))


def run(args, overrides) -> int:
    from hvdtrain import backend
    from hvdtrain.errors import UserError
    args.overrides = list(overrides)   # benchmarks pass config overrides on to their ranks
    module = _module(args.bench_command)
    if not backend.under_launcher():
        return module.run(args)
    if hasattr(module, "run_in_rank"):
        from hvdtrain.runtime import import_tensorflow
        import_tensorflow()   # quietly, before the rank's code imports it
        return module.run_in_rank(args)
    raise UserError(f"`hvdtrain bench {args.bench_command}` starts its own ranks: run it without a launcher "
                    "(horovodrun, mpirun, srun)")
