"""What `hvdtrain predict` and `hvdtrain evaluate` share: loading a trained run and naming its inputs.

A run is rebuilt from its config (run_dir/config.yaml, or the config stored in the checkpoint) and the
checkpoint's model weights; the checkpoint's signature must match the model the config builds. Inputs are
the training sources: the run's own data (`--split`), `digits`, `synthetic`, a `.npz` file or TFRecord files.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hvdtrain import checkpoint, config, data, dist, models
from hvdtrain.errors import UserError

BUILT_IN_INPUTS = ("digits", "synthetic")


def add_run_arguments(parser) -> None:
    """The options both commands take to find the trained model and its inputs."""
    parser.add_argument("--run", metavar="RUN_DIR", help="run directory of `hvdtrain train` (its config.yaml and latest checkpoint)")
    parser.add_argument("--checkpoint", metavar="PATH", help="a checkpoint directory (RUN_DIR/checkpoints/ckpt-N); "
                                                                 "without --run its own stored config is used")
    parser.add_argument("--input", metavar="SOURCE", help="digits | synthetic | FILE.npz (array x) | TFRecord files "
                                                          "(a directory, a glob or a file); default: the run's own data")
    parser.add_argument("--split", choices=("train", "test"), default="test",
                        help="which split of the run's data, digits or synthetic (default: test)")
    parser.add_argument("--batch-size", type=_positive, default=256, metavar="N", help="examples per batch on each rank (default: 256)")
    parser.add_argument("--report", metavar="FILE.json", help="also write the numbers printed at the end to this JSON file (rank 0)")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def start(overrides):
    """Check versions, start Horovod with this job's --runtime.* settings (threads, communication: they belong to
    the launch, not to the trained run), and return (topology, rank-aware logger)."""
    from hvdtrain import runtime
    from hvdtrain.log import get_logger
    runtime.check_versions()
    try:
        rt = config.load_config(None, [o for o in overrides if o.startswith("--runtime.")]).runtime
    except UserError as exc:
        exc.agreed = True  # every rank reads the same arguments: rank 0 alone reports it
        raise
    topo = dist.init(rt)
    runtime.configure(rt, topo.local_size)
    return topo, get_logger(topo.rank)


def write_report(path: str | None, report: dict, topo) -> None:
    """Rank 0 writes the report atomically; a failure stops every rank with one message."""
    def write():
        if path and topo.is_chief:
            try:
                checkpoint.write_json(Path(path), report)
            except OSError as exc:
                raise UserError(f"cannot write --report {path} ({exc.strerror}); choose a writable path") from None
    dist.agree_on_errors(write, "hvdtrain.report")


# ---------------------------------------------------------------- the trained model

@dataclass
class Loaded:
    cfg: config.Config
    model: object
    ckpt: Path
    input_shape: tuple


def locate(run: str | None, ckpt: str | None) -> str:
    """The checkpoint to load: --checkpoint, else the run directory's latest."""
    if ckpt:
        if not (Path(ckpt) / "meta.json").is_file():
            raise UserError(f"--checkpoint {ckpt} is not a checkpoint directory (no meta.json); "
                            "pass RUN_DIR/checkpoints/ckpt-N or use --run RUN_DIR")
        return ckpt
    if not run:
        raise UserError("say which model to use: --run RUN_DIR (a directory written by `hvdtrain train`) or --checkpoint PATH")
    if not (Path(run) / "config.yaml").is_file():
        what = "has no config.yaml" if Path(run).is_dir() else "does not exist"
        raise UserError(f"run directory {run} {what}; pass the trainer.run_dir of a `hvdtrain train` run with --run")
    latest = checkpoint.latest(Path(run))
    if latest is None:
        raise UserError(f"run directory {run} holds no checkpoint yet; train first: hvdtrain train --trainer.run_dir={run}")
    return str(latest)


def load(run: str | None, ckpt: str, overrides) -> Loaded:
    """Rebuild the model of the run (config + overrides), check the checkpoint fits it, restore its weights."""
    ckpt_path = Path(ckpt)
    meta = checkpoint.read_meta(ckpt_path)
    if run:
        cfg = config.load_config(Path(run) / "config.yaml", overrides)
    else:
        cfg = config.from_dict(meta.get("config", {}))
        for text in overrides:
            section, key, value = config.parse_override(text)
            cfg = cfg.replace(**{section: {key: value}})
    shape = tuple(meta.get("signature", {}).get("input_shape") or data.input_shape(cfg.data))
    model = models.build_model(cfg.model, shape, cfg.data.num_classes)
    checkpoint.check_compatible(ckpt_path, meta, checkpoint.signature(model, shape, cfg.data.num_classes, cfg.model.name))
    checkpoint.restore(ckpt_path, model)
    return Loaded(cfg, model, ckpt_path, shape)


def load_agreed(args, overrides) -> Loaded:
    """Every rank loads rank 0's choice of checkpoint (a run still training may gain one meanwhile); errors stop all ranks."""
    ckpt = dist.agree_on_errors(lambda: locate(args.run, args.checkpoint), "hvdtrain.locate")
    ckpt = dist.broadcast_object(ckpt, "hvdtrain.locate.chosen")
    return dist.agree_on_errors(lambda: load(args.run, ckpt, overrides), "hvdtrain.load")


# ---------------------------------------------------------------- inputs

def input_config(cfg: config.Config, source: str | None, shape: tuple) -> config.DataConfig:
    """The data config that reads --input: the run's own data, a built-in source, .npz or TFRecord files."""
    if source is None:
        return cfg.data
    if source in BUILT_IN_INPUTS:
        return dataclasses.replace(cfg.data, source=source, path="", test_path="",
                                   input_shape=shape if source == "synthetic" else ())
    if source.endswith(".npz"):
        return dataclasses.replace(cfg.data, source="npz", path=source, test_path=source, input_shape=())
    return dataclasses.replace(cfg.data, source="tfrecord", path=source, test_path=source, input_shape=shape)


def check_shape(found, expected, where: str) -> None:
    if tuple(found) != tuple(expected):
        raise UserError(f"{where}: examples have shape {list(found)} but the model expects {list(expected)}; "
                        "pass inputs of the shape it was trained on")


def read_npz_inputs(path: str) -> np.ndarray:
    """Array `x` of a .npz file; labels (`y`) are not needed to predict, and an empty `x` is allowed."""
    try:
        with np.load(path) as f:
            if "x" not in f:
                raise UserError(f"{path} must contain an array named 'x' (found: {', '.join(f.files) or 'none'})")
            return f["x"].astype(np.float32)
    except FileNotFoundError:
        raise UserError(f"input file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path} as a .npz file: {exc}") from None


def predict_share(loaded: Loaded, source: str | None, split: str, topo, batch: int):
    """This rank's contiguous share of the inputs to predict."""
    from hvdtrain import predict
    data_cfg = input_config(loaded.cfg, source, loaded.input_shape)
    if data_cfg.source == "tfrecord":
        path = data_cfg.test_path if split == "test" else data_cfg.path
        if not path:
            raise _no_split(data_cfg, split)
        return predict.tfrecord_share(data.list_files(path), data_cfg, topo, batch)
    if source and data_cfg.source == "npz":
        x = read_npz_inputs(source)
    else:
        arrays = data.load_arrays(data_cfg, split)
        if arrays is None:
            raise _no_split(data_cfg, split)
        x = arrays.x
    check_shape(x.shape[1:], loaded.input_shape, source or data_cfg.source)
    return predict.array_share(x, topo, batch)


def _no_split(data_cfg, split: str) -> UserError:
    return UserError(f"the run's data ({data_cfg.source}) has no {split} split; "
                     "pass --input FILE (.npz, or TFRecord files) or --split train")


def eval_share(loaded: Loaded, source: str | None, split: str, topo, batch: int):
    """(dataset, size) of this rank's share of a labelled split, for exact evaluation."""
    data_cfg = input_config(loaded.cfg, source, loaded.input_shape)
    share = data.eval_data(data_cfg, topo, split, batch)
    if share is None:
        raise _no_split(data_cfg, split)
    check_shape(share[0].element_spec[0].shape[1:], loaded.input_shape, source or data_cfg.source)
    return share
