"""Exact loss and accuracy of a trained model over a whole labelled set, on any number of ranks.

Each rank scores a contiguous share of the set; the loss sum, correct count and example count are all-reduced
and divided once, so the result equals a single-process evaluation of the same checkpoint and data.

Examples:
  scripts/launch.sh 2 hvdtrain evaluate --run runs/digits                       # the test split of the run's data
  hvdtrain evaluate --run runs/digits --split train --report train-metrics.json
  scripts/launch.sh 4 hvdtrain evaluate --run runs/big --input 'held_out/*.tfrecord'
"""
from __future__ import annotations

HELP = "exact loss/accuracy of a trained run over a whole split (all-reduced sums, any number of ranks)"


def add_arguments(parser) -> None:
    from hvdtrain import inference
    inference.add_run_arguments(parser)


def run(args, overrides) -> int:
    import time

    from hvdtrain import dist, inference, predict
    topo, log = inference.start(overrides)
    loaded = inference.load_agreed(args, overrides)
    dataset, _ = dist.agree_on_errors(lambda: inference.eval_share(loaded, args.input, args.split, topo, args.batch_size),
                                      "hvdtrain.evaluate.inputs")
    started = time.perf_counter()
    metrics = predict.exact_metrics(loaded.model, dataset, topo, "hvdtrain.evaluate")
    seconds = time.perf_counter() - started
    name = args.input if args.input and args.input not in inference.BUILT_IN_INPUTS else args.split
    log.info(f"{name} accuracy {metrics['accuracy']:.4f}  {name} loss {metrics['loss']:.4f}  "
             f"({metrics['examples']} examples, {metrics['correct']} correct, {topo.size} rank(s), "
             f"{metrics['examples'] / max(seconds, 1e-9):,.0f} samples/s)")
    inference.write_report(args.report, {**metrics, "split": args.split, "input": args.input, "ranks": topo.size,
                                         "checkpoint": str(loaded.ckpt)}, topo)
    return 0
