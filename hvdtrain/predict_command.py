"""Score inputs with a trained model on every rank and write the results once, in input order.

Launch it like training (horovodrun -np N, srun, or one process). Each rank loads the checkpoint and scores a
contiguous share of the inputs (no model synchronisation, no padding, no dropped inputs); rank 0 merges the
ranks' parts into --output, whose suffix picks the format:

  .npy    --fields probs: float32 [N, classes]; class: int64 [N]; both: structured array, fields 'class' and 'probs'
  .csv    a header line, then index,class,prob_0,...   (index = position in the input)
  .jsonl  one {"index": i, "class": c, "probs": [...]} object per line

Examples:
  scripts/launch.sh 2 hvdtrain predict --run runs/digits --output preds.csv            # the run's test split
  scripts/launch.sh 4 hvdtrain predict --run runs/digits --input new.npz --output preds.npy --fields class
  hvdtrain predict --checkpoint runs/x/checkpoints/ckpt-00000420 --input 'shards/*.tfrecord' --output p.jsonl

Throughput (samples/s per rank and in total) is printed at the end. The output's directory must be shared by
all ranks (each rank writes a hidden part file there until the merge); a failure leaves no output file.
"""
from __future__ import annotations

HELP = "score inputs with a trained model on every rank; write probabilities/classes in input order"


def add_arguments(parser) -> None:
    from hvdtrain import inference
    inference.add_run_arguments(parser)
    parser.add_argument("--output", required=True, metavar="FILE", help="result file: .npy, .csv or .jsonl")
    parser.add_argument("--fields", default="class,probs", metavar="LIST",
                        help="what to write per input: class, probs, or both (default: class,probs)")


def run(args, overrides) -> int:
    import secrets

    from hvdtrain import dist, inference, predict
    topo, log = inference.start(overrides)
    out = predict.OrderedOutput(args.output, args.fields.split(","), topo,
                                token=dist.broadcast_object(secrets.token_hex(4), "hvdtrain.predict.token"))
    try:
        dist.agree_on_errors(out.open, "hvdtrain.predict.open")    # an unwritable output fails before any work
        dist.agree_on_errors(out.check_shared, "hvdtrain.predict.shared")
        loaded = inference.load_agreed(args, overrides)
        share = dist.agree_on_errors(lambda: inference.predict_share(loaded, args.input, args.split, topo, args.batch_size),
                                     "hvdtrain.predict.inputs")
        log.info(f"predicting with {loaded.ckpt} on {topo.size} rank(s)")
        report = predict.predict_to_file(loaded.model, share, topo, out, loaded.cfg.data.num_classes)
    finally:
        out.discard()
    ranks = ", ".join(f"rank {r['rank']}: {r['samples_per_sec']:,.0f}/s" for r in report["per_rank"])
    log.info(f"wrote {args.output}: {report['examples']} rows ({', '.join(out.fields)}) in {report['seconds']:.2f} s, "
             f"{report['samples_per_sec']:,.0f} samples/s on {topo.size} rank(s) ({ranks})")
    inference.write_report(args.report, {**report, "output": args.output, "checkpoint": str(loaded.ckpt)}, topo)
    return 0
