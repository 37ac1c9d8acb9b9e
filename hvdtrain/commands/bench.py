"""`hvdtrain bench`: the benchmarks of hvdtrain/bench/ (each prints a table and writes JSON + a PNG).

  hvdtrain bench allreduce   all-reduce latency and bus bandwidth vs raw MPI_Allreduce (MPI and Gloo)
  hvdtrain bench train       training throughput and weak scaling (mlp, cnn, resnet50) vs MultiWorkerMirroredStrategy
  hvdtrain bench stacks      the TF 2.21 stack (hvdtrain's Keras 3 layer) against TF 2.15 (Horovod's Keras 2 layer)
  hvdtrain bench predict     data-parallel inference speed-up
  hvdtrain bench tune        the evidence behind the communication defaults
  hvdtrain bench pipeline    pipeline stages: the idle bubble against (P-1)/(M+P-1), memory per rank
  hvdtrain bench sync        communicating less: FedAvg vs FedSGD rounds, local SGD accuracy vs bytes
  hvdtrain bench serve       online serving: throughput, p50/p99 latency, replicas over time, batching on vs off
  hvdtrain bench tensor      tensor parallelism: memory per rank, split-layer bytes against the formula, D x T vs D
  hvdtrain bench memory      sharded optimizer state (ZeRO): bytes per rank, peak memory, step time at stages 0/1/2
  hvdtrain bench report      docs/benchmarks.md from those files

The plots need matplotlib: pip install "hvdtrain[bench]"; bench serve also needs "hvdtrain[serve]".
"""
from hvdtrain.bench import HELP, add_arguments, run   # the package is the command

__all__ = ["HELP", "add_arguments", "run"]
