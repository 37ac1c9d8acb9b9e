"""Export a trained run's model.keras as a TensorFlow SavedModel (serving) or a TFLite file (phones, edge devices).

Before the export is put in place, both models score the run's own held-out data (the test split, or the training
split if the run has none; at most --check-examples examples) and must agree: an unquantized export to float rounding,
a dynamic-range quantized one (int8 weights, a quarter of the size) within 0.02 of the Keras model's accuracy. The
largest difference and each model's accuracy are printed; a failed check writes nothing.

Examples:
  hvdtrain export runs/digits --format saved_model                  # -> runs/digits/export/saved_model
  hvdtrain export runs/digits --format tflite                       # -> runs/digits/export/model.tflite
  hvdtrain export runs/digits --format tflite --quantize dynamic    # -> runs/digits/export/model-dynamic.tflite
  hvdtrain export runs/digits --format tflite --output phone/digits.tflite --report export.json

One process is enough (export reads one model.keras; it needs no launcher).
"""
from __future__ import annotations

from hvdtrain.commands.common import positive

HELP = "write a run's model.keras as a SavedModel or TFLite file, checked against the Keras model"


def add_arguments(parser) -> None:
    parser.add_argument("run", metavar="RUN_DIR", help="run directory of a completed `hvdtrain train` (its model.keras)")
    parser.add_argument("--format", required=True, choices=("saved_model", "tflite"), help="what to write")
    parser.add_argument("--quantize", choices=("dynamic",),
                        help="tflite: dynamic-range quantization (int8 weights, float computation)")
    parser.add_argument("--output", metavar="PATH", help="where to write it (default: RUN_DIR/export/saved_model, "
                                                         "RUN_DIR/export/model.tflite or model-dynamic.tflite)")
    parser.add_argument("--check-examples", type=positive, default=1000, metavar="N",
                        help="held-out examples both models score for the agreement check (default: 1000)")
    parser.add_argument("--report", metavar="FILE.json", help="also write the numbers printed to this JSON file")


def run(args, overrides) -> int:
    from pathlib import Path

    from hvdtrain import runtime
    from hvdtrain.inference import export as exporting
    from hvdtrain.log import get_logger
    from hvdtrain.rundir import write_json

    runtime.import_tensorflow()   # without its banners
    log = get_logger(0)
    run_dir = Path(args.run)
    output = Path(args.output) if args.output else exporting.default_output(run_dir, args.format, args.quantize)
    agreement = exporting.export(run_dir, args.format, args.quantize, output, overrides, args.check_examples)
    report = exporting.report(agreement, output, args.format, args.quantize)
    quantized = f" ({args.quantize}-range quantized)" if args.quantize else ""
    log.info(f"exported {run_dir / 'model.keras'} as {args.format}{quantized}: {output} ({report['bytes']:,} bytes)")
    log.info(f"agrees with the Keras model {agreement.describe()}")
    if args.report:
        write_json(Path(args.report), report)
    return 0
