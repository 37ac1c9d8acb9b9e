"""Benchmarks (the `benchmarks/` package of the repository checkout): each prints a table and writes JSON + a PNG.
This module only forwards to that package, so the installed hvdtrain carries no benchmark code.

  hvdtrain bench allreduce   all-reduce latency and bus bandwidth vs raw MPI_Allreduce (MPI and Gloo)
  hvdtrain bench train       training throughput and weak scaling (mlp, cnn, resnet50) vs MultiWorkerMirroredStrategy
  hvdtrain bench stacks      the TF 2.21 stack (hvdtrain's Keras 3 layer) against TF 2.15 (Horovod's Keras 2 layer)
  hvdtrain bench predict     data-parallel inference speed-up
  hvdtrain bench tune        the evidence behind the communication defaults
  hvdtrain bench report      docs/benchmarks.md from those files
"""
from __future__ import annotations

HELP = "benchmarks: all-reduce, training throughput and scaling, stacks, inference (JSON + PNG + table)"


def _benchmarks():
    try:
        import benchmarks
    except ImportError:
        from hvdtrain.errors import UserError
        raise UserError("the benchmarks ship with the repository checkout (benchmarks/): install hvdtrain from it "
                        "with scripts/install.sh") from None
    return benchmarks


def add_arguments(parser) -> None:
    try:
        _benchmarks().add_arguments(parser)
    except Exception:   # a checkout without benchmarks/: the command explains itself when run
        pass


def run(args, overrides) -> int:
    return _benchmarks().run(args, overrides)
