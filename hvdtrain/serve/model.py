"""What one replica serves: the whole model (a run's model.keras, a .keras file or a SavedModel export) or one stage of
a pipeline-trained run, restored from its own part of the run's latest checkpoint, so that the replica holds only
that stage's weights. `Source` names it (found by the driver from files alone, without TensorFlow); `load` makes it,
inside the replica, a function of a float32 numpy batch with the signature it takes and gives.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from hvdtrain.errors import UserError, first_line
from hvdtrain.serve.protocol import Signature, Tensor

@dataclass(frozen=True)
class Source:
    kind: str               # keras | saved_model | stage
    path: str               # the .keras file, the SavedModel directory, or the run directory (stage)
    stage: int = 0          # stage: which one (0-based) of `stages`
    stages: int = 1

    def for_stage(self, stage: int) -> "Source":
        return Source(self.kind, self.path, stage, self.stages)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if self.kind == "stage":
            return f"{self.stages} pipeline stages of {self.path} (its latest checkpoint, stage by stage)"
        return self.path


def find(path: str, stages: int = 1) -> Source:
    """The Source a user's MODEL argument names: a run directory (its model.keras; with stages > 1 its checkpoint's
    stages), a .keras file, or a SavedModel directory (e.g. RUN_DIR/export/saved_model); a one-line error if none."""
    p = Path(path).absolute()   # replicas run in other directories (and, on a cluster, on other nodes)
    if stages > 1:
        _check_stages(p, stages)
        return Source("stage", str(p), 0, stages)
    if p.is_dir() and (p / "config.yaml").is_file():
        if not (p / "model.keras").is_file():
            raise UserError(f"run directory {p} has no model.keras (written when training completes); finish the run "
                            f"first (hvdtrain train --trainer.run_dir={p} resumes it), or serve an export")
        return Source("keras", str(p / "model.keras"))
    if p.is_file() and p.suffix == ".keras":
        return Source("keras", str(p))
    if p.is_dir() and (p / "saved_model.pb").is_file():
        return Source("saved_model", str(p))
    what = "does not exist" if not p.exists() else "is not a run directory (no config.yaml), a .keras file or a " \
                                                   "SavedModel directory (no saved_model.pb)"
    raise UserError(f"{path} {what}; pass the trainer.run_dir of a completed `hvdtrain train` run, a .keras file or "
                    "the directory `hvdtrain export --format saved_model` wrote")


def _check_stages(run: Path, stages: int) -> None:
    """--stages P serves a run trained with P pipeline stages: each stage's replicas load its part of the checkpoint."""
    from hvdtrain import checkpoint
    if not (run / "config.yaml").is_file():
        raise UserError(f"--stages {stages} serves the run directory of a pipeline-trained run; {run} has no "
                        "config.yaml")
    latest = checkpoint.latest(run)
    if latest is None:
        raise UserError(f"run directory {run} holds no checkpoint; --stages {stages} restores each stage from the "
                        "run's latest checkpoint")
    signature = checkpoint.read_meta(latest).get("signature", {})
    layout, split = signature.get("pipeline"), signature.get("tensor")
    if split:
        raise UserError(f"--stages {stages}: {run} was trained with layers split over {split['degree']} ranks "
                        "(parallel.tensor_parallel), which a stage replica does not put back together; serve it "
                        "without --stages (its model.keras is the whole model)")
    if not layout:
        raise UserError(f"--stages {stages}: {run} was trained without pipeline stages, so its checkpoint holds the "
                        "whole model; serve it without --stages (each replica then holds the whole model)")
    if layout["stages"] != stages:
        raise UserError(f"--stages {stages}: {run} was trained with {layout['stages']} pipeline stages (beginning at "
                        f"{', '.join(layout['first_layers'])}); serve it with --stages {layout['stages']}")


class Served:
    """A loaded model or stage: call it with a float32 batch; `signature` is what it takes and gives;
    `held_parameters` counts the weights this process holds (every Keras weight made in it)."""

    def __init__(self, call, signature: Signature, held_parameters: int):
        self._call, self.signature, self.held_parameters = call, signature, held_parameters

    def __call__(self, batch):
        return self._call(batch)


def load(source: Source, threads: int) -> Served:
    """Load `source` in this process, TensorFlow limited to `threads` intra-op threads (the replica's cores)."""
    from hvdtrain import runtime
    tf = runtime.import_tensorflow()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:   # TensorFlow already ran in this process (not a replica's): its threads stay as they are
        pass
    if source.kind == "saved_model":
        return _saved_model(source.path)
    model = _stage(Path(source.path), source.stage, source.stages) if source.kind == "stage" else _keras(source.path)
    # Keras's compiled predict step: the same computation as model.predict on the same batch.
    return Served(model.predict_on_batch, Signature(_tensor(model.inputs[0]), _tensor(model.outputs[0])),
                  _made_parameters())


def _made_parameters() -> int:
    """Parameters of every Keras weight made in this process, wherever it is referenced: a stage's replica must hold
    its stage's alone."""
    import gc
    import math

    import keras
    gc.collect()
    return sum(math.prod(v.shape) for v in gc.get_objects()
               if isinstance(v, keras.Variable) and getattr(v, "_value", True) is not None)


def _keras(path: str):
    import keras
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:   # a corrupt or foreign file: Keras raises many kinds
        raise UserError(f"cannot load {path} ({first_line(exc)}); pass a model.keras written by hvdtrain train") from None


def _stage(run: Path, stage: int, stages: int):
    """Stage `stage` of the run's model with only its own weights made (Keras's stateless scope defers the others',
    as pipeline training does on ranks other than 0), restored from the checkpoint's `stage-<s>/state`."""
    import keras

    from hvdtrain import checkpoint, config, models
    from hvdtrain.pipeline import make_only
    from hvdtrain.pipeline.split import plan
    from hvdtrain.strategies.pipeline import restore_stage
    from hvdtrain.tasks import Task
    ckpt = checkpoint.latest(run)
    meta = checkpoint.read_meta(ckpt)
    cfg = config.load_config(run / "config.yaml")
    task = Task.from_config(cfg.data, cfg.trainer.top_k)
    shape, layout = tuple(meta["signature"]["input_shape"]), meta["signature"]["pipeline"]
    with keras.StatelessScope(initialize_variables=False):
        whole = models.build_model(cfg.model, shape, task.outputs)
    expected = {**checkpoint.signature(whole, shape, task.outputs, cfg.model.name), "pipeline": layout}
    checkpoint.check_compatible(ckpt, meta, expected)
    _, stage_models = plan(whole, stages, tuple(layout["first_layers"][1:]))
    mine = stage_models[stage]
    make_only(mine)   # its deferred weights made now (the others never are), then read from its part
    restore_stage(ckpt, mine, stage)
    return mine


def _saved_model(path: str) -> Served:
    import tensorflow as tf
    try:
        loaded = tf.saved_model.load(path)
        serve = loaded.serve
    except Exception as exc:
        raise UserError(f"cannot load the SavedModel {path} ({first_line(exc)}); pass a directory written by "
                        "`hvdtrain export --format saved_model`") from None
    spec = serve.input_signature[0]
    out = tf.nest.flatten(serve.get_concrete_function().structured_outputs)[0]
    signature = Signature(Tensor(spec.name or "inputs", tuple(spec.shape[1:]), spec.dtype.name),
                          Tensor(out.name.split(":")[0] or "output_0", tuple(out.shape[1:]), out.dtype.name))

    def call(batch):
        return serve(tf.constant(batch)).numpy()
    call.held = loaded   # the functions need their object alive
    return Served(call, signature, sum(int(v.shape.num_elements()) for v in loaded.variables))


def _tensor(keras_tensor) -> Tensor:
    """Named after the layer that makes it (an output's own name is Keras's internal keras_tensor_N)."""
    history = getattr(keras_tensor, "_keras_history", None)
    name = history.operation.name if history else keras_tensor.name
    return Tensor(name, tuple(int(d) for d in keras_tensor.shape[1:]), str(keras_tensor.dtype))
