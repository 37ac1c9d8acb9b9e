"""Exact metrics of a trained model over a whole labelled set, on any number of ranks.

The single-process run's batches (--batch-size) are dealt whole to the ranks in turn; the task's sums (loss,
correct, absolute error, counts) of every batch are gathered, added in batch order and divided once, so the result
equals a single-process evaluation of the same checkpoint and data bit for bit, on any CPU.
Every input file is read and checked first (a corrupt one is named, on every rank, before any scoring).
With --parallel.pipeline_stages=P (an MPI launch of a multiple of P ranks) the model runs split into P stages, each
batch passing through them (model-parallel inference); the result is the same.

Examples:
  scripts/launch.sh 2 hvdtrain evaluate --run runs/digits                       # the test split of the run's data
  hvdtrain evaluate --run runs/digits --split train --report train-metrics.json
  scripts/launch.sh 4 hvdtrain evaluate --run runs/big --input 'held_out/*.tfrecord'
  scripts/launch.sh 2 hvdtrain evaluate --run runs/digits --parallel.pipeline_stages=2     # through 2 stages
"""
from __future__ import annotations

from hvdtrain.commands.common import add_run_arguments

HELP = "exact metrics of a trained run over a whole split (one process's result at any number of ranks)"


def add_arguments(parser) -> None:
    add_run_arguments(parser)


def run(args, overrides) -> int:
    import time

    from hvdtrain import backend, strategies
    from hvdtrain.commands.common import check_shape, inputs_source, start, write_report
    from hvdtrain.data.inputs import BUILT_IN
    from hvdtrain.inference.run import load_agreed

    world, log = start(overrides)
    strategy = strategies.for_world(world)   # through the stages when launched with them
    trained = load_agreed(args.run, args.checkpoint, overrides, world)
    source = backend.agree_on_errors(lambda: inputs_source(trained, args.input), "hvdtrain.evaluate.source")
    split = "test" if args.input and args.input not in BUILT_IN else args.split
    source.adopt(split, backend.gather_agreed(lambda: source.validate(world, split), "hvdtrain.evaluate.validate"))

    def checked():
        share = source.eval_share(strategy.data_view(), split, args.batch_size)
        check_shape(share.dataset.element_spec[0].shape[1:], trained.input_shape, args.input or source.cfg.source)
    backend.agree_on_errors(checked, "hvdtrain.evaluate.inputs")
    started = time.perf_counter()
    metrics = strategy.evaluate_trained(trained, source, split, args.batch_size)
    seconds = time.perf_counter() - started
    name = args.input if args.input and args.input not in BUILT_IN else args.split
    shown = "  ".join(f"{name} {k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    correct = f", {metrics['correct']} correct" if "correct" in metrics else ""
    log.info(f"{shown}  ({metrics['examples']} examples{correct}, {world.size} rank(s), "
             f"{metrics['examples'] / max(seconds, 1e-9):,.0f} samples/s)")
    write_report(args.report, {**metrics, "split": args.split, "input": args.input, "ranks": world.size,
                               "checkpoint": str(trained.ckpt)}, world)
    return 0
