"""What several commands share: finding a trained run and its inputs, starting the ranks, writing a report."""
from __future__ import annotations

import argparse
from pathlib import Path

from hvdtrain import backend
from hvdtrain.errors import UserError

OVERRIDES_EPILOG = ("Any config key can be overridden after the options as --section.key=value, e.g.\n"
                    "  --trainer.epochs=5 --optim.lr=0.1 --data.input_shape=[32,32,3]\n"
                    "`hvdtrain config --reference` lists every key with its default and meaning.")


def add_run_arguments(parser) -> None:
    """The options evaluate and predict take to find the trained model and its inputs."""
    parser.add_argument("--run", metavar="RUN_DIR", help="run directory of `hvdtrain train` (its config.yaml and latest checkpoint)")
    parser.add_argument("--checkpoint", metavar="PATH", help="a checkpoint directory (RUN_DIR/checkpoints/ckpt-N); "
                                                             "without --run its own stored config is used")
    parser.add_argument("--input", metavar="SOURCE",
                        help="digits | synthetic | FILE.npz | TFRecord files (a directory, a glob or a file) | a directory "
                             "of images (class folders to evaluate; any layout to predict); default: the run's own data")
    parser.add_argument("--split", choices=("train", "test"), default="test",
                        help="which split of the run's data, digits or synthetic (default: test)")
    parser.add_argument("--batch-size", type=positive, default=256, metavar="N",
                        help="examples per batch on each rank (default: 256)")
    parser.add_argument("--report", metavar="FILE.json", help="also write the numbers printed at the end to this JSON file (rank 0)")


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def start(overrides):
    """Start the ranks with this job's --runtime.* settings (threads, communication: they belong to the launch, not to
    the trained run) and its --parallel.pipeline_stages and --parallel.tensor_parallel; returns (world, rank-aware
    logger)."""
    from hvdtrain import config, world
    from hvdtrain.log import get_logger
    cfg = config.load_config(None, [o for o in overrides if o.startswith(("--runtime.", "--parallel."))])
    w = world.start(cfg.runtime, stages=cfg.parallel.pipeline_stages, tensor=cfg.parallel.tensor_parallel)
    return w, get_logger(w.rank)


def write_report(path: str | None, report: dict, world) -> None:
    """Rank 0 writes the report atomically; a failure stops every rank with one message."""
    from hvdtrain.rundir import write_json

    def write():
        if path and world.is_chief:
            try:
                write_json(Path(path), report)
            except OSError as exc:
                raise UserError(f"cannot write --report {path} ({exc.strerror}); choose a writable path") from None
    backend.agree_on_errors(write, "hvdtrain.report")


def inputs_source(trained, input_source: str | None):
    """The data source that reads --input (or the run's own data) for a trained run."""
    from hvdtrain.data import ImageFolders, open_source
    from hvdtrain.data.inputs import input_config
    source = open_source(input_config(trained.cfg.data, input_source, trained.input_shape))
    if isinstance(source, ImageFolders):   # class folders are labelled by the model's class names, not their order
        source.use_classes(trained.class_names)
    return source


def check_shape(found, expected, where: str) -> None:
    from hvdtrain.errors import DataError
    if tuple(found) != tuple(expected):
        raise DataError(f"{where}: examples have shape {list(found)} but the model expects {list(expected)}; "
                        "pass inputs of the shape it was trained on")
