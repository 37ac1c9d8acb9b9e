"""Score inputs with a trained model on every rank and write the results once, in input order.

Launch it like training (horovodrun -np N, srun, or one process). Each rank loads the checkpoint and scores whole
batches of --batch-size inputs in turn (rank r: batches r, r+N, ...; no model synchronisation, no padding, no
dropped inputs), so every input is scored in the same batch as in one process and the output is the same bytes at
any N; rank 0 merges the ranks' parts into --output, whose suffix picks the format:

  .npy    one field: a plain array (probs: float32 [N, classes]; class: int64 [N]); several: a structured array
  .csv    a header line, then index,class,prob_0,...   (index = position among the listed inputs)
  .jsonl  one {"index": i, "class": c, "probs": [...]} object per line

Fields (--fields) by the run's task: classification class, name (the class's name, e.g. an image folder's),
probs; multilabel labels (0/1 per class), probs; regression value. Image inputs (a folder) also have path (the
image's file; written by default). With data.bad_files=skip a skipped image has no row and the others keep their
index.

Examples:
  scripts/launch.sh 2 hvdtrain predict --run runs/digits --output preds.csv            # the run's test split
  scripts/launch.sh 4 hvdtrain predict --run runs/digits --input new.npz --output preds.npy --fields class
  scripts/launch.sh 2 hvdtrain predict --run runs/flowers --input photos/ --output p.csv --fields name,probs
  hvdtrain predict --checkpoint runs/x/checkpoints/ckpt-00000420 --input 'shards/*.tfrecord' --output p.jsonl
  scripts/launch.sh 4 hvdtrain predict --run runs/digits --output preds.csv --parallel.pipeline_stages=2

With --parallel.pipeline_stages=P (an MPI launch of a multiple of P ranks) the model runs split into P stages, each
batch passing through them (model-parallel inference): the output is the same bytes.

Every input is read and checked before anything is written; throughput (samples/s per rank and in total) is
printed at the end. The output's directory must be shared by all ranks (each rank writes a hidden part file there
until the merge); a failure leaves no output file.
"""
from __future__ import annotations

from hvdtrain.commands.common import add_run_arguments

HELP = "score inputs with a trained model on every rank; write predictions in input order"


def add_arguments(parser) -> None:
    add_run_arguments(parser)
    parser.add_argument("--output", required=True, metavar="FILE", help="result file: .npy, .csv or .jsonl")
    parser.add_argument("--fields", metavar="LIST",
                        help="what to write per input, comma-separated (default: class,probs; multilabel labels,probs; "
                             "regression value; image inputs add path)")


def run(args, overrides) -> int:
    import secrets

    from hvdtrain import backend, strategies
    from hvdtrain.commands.common import inputs_source, start, write_report
    from hvdtrain.data.inputs import BUILT_IN, is_unlabelled, lists_files
    from hvdtrain.inference import OrderedOutput
    from hvdtrain.inference.run import load_agreed

    world, log = start(overrides)
    strategy = strategies.for_world(world)   # through the stages when launched with them
    trained = load_agreed(args.run, args.checkpoint, overrides, world)
    readers = strategy.data_view()   # a pipeline's stages all see their replica's batches
    token = backend.broadcast_object(secrets.token_hex(4), "hvdtrain.predict.token")
    paths = lists_files(args.input, trained.cfg.data)
    fields = args.fields.split(",") if args.fields else trained.task.default_fields() + (("path",) if paths else ())
    out = OrderedOutput(args.output, fields, world, token, trained.task, paths)
    try:
        backend.agree_on_errors(lambda: out.open(trained.class_names), "hvdtrain.predict.open")  # fails before any work
        backend.agree_on_errors(out.check_shared, "hvdtrain.predict.shared")

        if is_unlabelled(args.input):
            got = backend.agree_on_errors(lambda: _unlabelled(args.input, trained, world, readers, args.batch_size),
                                          "hvdtrain.predict.inputs")
        else:
            source = backend.agree_on_errors(lambda: inputs_source(trained, args.input), "hvdtrain.predict.source")
            split = "test" if args.input and args.input not in BUILT_IN else args.split
            source.adopt(split, backend.gather_agreed(lambda: source.validate(world, split), "hvdtrain.predict.validate"))
            got = backend.agree_on_errors(lambda: _checked(source.predict_share(readers, split, args.batch_size),
                                                           trained, args.input or source.cfg.source),
                                          "hvdtrain.predict.share")
        log.info(f"predicting with {trained.ckpt} on {world.describe()}")
        report = strategy.predict_trained(trained, got, out)
    finally:
        out.discard()
    ranks = ", ".join(f"rank {r['rank']}: {r['samples_per_sec']:,.0f}/s" for r in report["per_rank"]
                      if r["examples"])   # the ranks that wrote rows (a pipeline's last stages)
    log.info(f"wrote {args.output}: {report['examples']} rows ({', '.join(out.fields)}) in {report['seconds']:.2f} s, "
             f"{report['samples_per_sec']:,.0f} samples/s on {world.size} rank(s) ({ranks})")
    write_report(args.report, {**report, "output": args.output, "checkpoint": str(trained.ckpt)}, world)
    return 0


def _unlabelled(source: str, trained, world, readers, batch: int):
    from hvdtrain.data.inputs import check_images, unlabelled_share
    if not source.endswith(".npz"):
        check_images(source, world, trained.cfg.data)
    return _checked(unlabelled_share(source, trained.cfg.data, readers, batch), trained, source)


def _checked(share, trained, where):
    from hvdtrain.commands.common import check_shape
    check_shape(share.dataset.element_spec.shape[1:], trained.input_shape, where)
    return share
