"""A trained run, loaded for evaluation or prediction: its config (run_dir/config.yaml, or the config stored in the
checkpoint) plus this command's overrides, the model it builds, and the checkpoint's weights, which must fit it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hvdtrain import backend, checkpoint, config, models, strategies
from hvdtrain.data import open_source
from hvdtrain.errors import UserError
from hvdtrain.rundir import RunDir
from hvdtrain.tasks import Task


@dataclass
class TrainedRun:
    cfg: config.Config
    model: object
    ckpt: Path
    input_shape: tuple
    task: Task
    class_names: list | None


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


def load(run: str | None, ckpt: str, overrides) -> TrainedRun:
    """Rebuild the run's model (config + overrides), check that the checkpoint fits it, restore its weights."""
    ckpt_path = Path(ckpt)
    meta = checkpoint.read_meta(ckpt_path)
    cfg = config.load_config(Path(run) / "config.yaml", overrides) if run else \
        config.with_overrides(meta.get("config", {}), overrides)
    signature = meta.get("signature", {})
    shape = tuple(signature.get("input_shape") or open_source(cfg.data).example_shape())
    task = Task.from_config(cfg.data, cfg.trainer.top_k)
    model = models.build_model(cfg.model, shape, task.outputs)
    expected = checkpoint.signature(model, shape, task.outputs, cfg.model.name)
    checkpoint.check_compatible(ckpt_path, meta, expected)   # any layout: its parts are read into one model
    strategies.restore_whole(ckpt_path, model, meta)
    run_dir = RunDir(run) if run else RunDir(ckpt_path.parent.parent)
    return TrainedRun(cfg, model, ckpt_path, shape, task, run_dir.read_classes() or meta.get("classes"))


def load_agreed(run: str | None, ckpt: str | None, overrides, world) -> TrainedRun:
    """Every rank loads rank 0's choice of checkpoint (a run still training may gain one meanwhile); errors stop all."""
    chosen = backend.agree_on_errors(lambda: locate(run, ckpt), "hvdtrain.locate")
    chosen = backend.broadcast_object(chosen, "hvdtrain.locate.chosen")
    return backend.agree_on_errors(lambda: load(run, chosen, overrides), "hvdtrain.load")
