"""Pipeline and hybrid data x pipeline parallelism (parallel.pipeline_stages = P > 1): each rank trains one stage of
the model (hvdtrain/pipeline/: the split, the schedules, the stage as a Keras model, evaluation and prediction
through the stages); each stage's gradients are averaged over its D replicas. With parallel.tensor_parallel = T > 1
the model is first made tensor-parallel (strategies.tensor), then cut: each stage's split layers are split over T
ranks (P x T, D x P x T). This module wires it into a run."""
from __future__ import annotations

from hvdtrain import backend, checkpoint
from hvdtrain import pipeline as pipelines
from hvdtrain.pipeline import serving
from hvdtrain.pipeline.split import plan as split_plan
from hvdtrain.errors import UserError
from hvdtrain.log import get_logger
from hvdtrain.strategies import tensor
from hvdtrain.strategies.base import DataParallel


class Pipeline(DataParallel):
    name = "pipeline"

    def __init__(self, world, settings, global_batch: int, run=None, resume: str = "auto"):
        """`settings`: config.ParallelConfig; `run`: the run directory, whose latest checkpoint's split a resume keeps
        (unless `resume` is never)."""
        super().__init__(world, settings.shard_state)
        if world.stages == 1:
            raise UserError("hvdtrain.keras.pipeline needs pipeline stages: start with "
                            "hvdtrain.keras.init(pipeline_stages=P), P > 1, under an MPI launch", agreed=True)
        self.settings, self.global_batch, self.run, self.resume = settings, global_batch, run, resume
        self.built = None   # pipeline.Pipeline, once prepared
        self.split = None   # tensor.shard.SplitModel, with tensor-parallel stages

    @classmethod
    def from_config(cls, cfg, world, *, source=None, run=None) -> "Pipeline":
        return cls(world, cfg.parallel, cfg.trainer.global_batch_size, run, cfg.trainer.resume)

    @classmethod
    def reader(cls, world) -> "Pipeline":
        """For reading a trained model through the stages (evaluate, predict), not for training."""
        from hvdtrain.config import ParallelConfig
        return cls(world, ParallelConfig(pipeline_stages=world.stages), global_batch=0)

    def build_model(self, builder):
        """The whole model; on ranks other than 0 without its weights (see pipeline.build_whole)."""
        return pipelines.build_whole(builder, self.world, self.settings.stage_only)

    def prepare(self, model, objective, optimizer=None):
        """This rank's stage of the whole `model` (a Keras model whose train step runs the schedule); with
        tensor-parallel ranks, of its tensor-parallel model."""
        if self.world.tensor > 1:
            self.split = tensor.split_of(model, self.settings.tensor_plan, self.world)
        self.built = pipelines.build(self.settings, self.world, model, objective, get_logger(self.world.rank),
                                     self.global_batch, self._kept_split(), cut=self.split and self.split.model)
        if optimizer is not None:
            self.built.stage.compile(optimizer=optimizer, jit_compile=False)
        return self.built.stage

    def _kept_split(self) -> tuple:
        """The split of the run's latest checkpoint, when it has one of as many stages (a resume keeps it)."""
        latest = checkpoint.latest(self.run.path) if self.run is not None and self.resume != "never" else None
        layout = checkpoint.read_meta(latest).get("signature", {}).get("pipeline") if latest else None
        return tuple(layout["first_layers"][1:]) if layout and layout["stages"] == self.world.stages else ()

    def signature(self, whole: dict) -> dict:   # another split is refused
        return {**super().signature(whole), "pipeline": self.built.layout(),
                **({"tensor": tensor.layout(self.split)} if self.split else {})}

    @property
    def weights_part(self):   # each part's first replica writes it
        return part_name(self.world.stage, self.world.tensor_rank if self.split else None), self.world.replica == 0

    def check(self, model) -> None:
        """A stage's optimizer must average over the stage's replicas only (over all ranks, the stages' different
        gradients would meet in one all-reduce)."""
        self._own(model)
        if backend.averaging_group(model.optimizer) != self.world.replica_group:
            raise UserError("a pipeline stage's optimizer must average over the stage's replicas: compile it with "
                            "hvdtrain.keras.distribute(optimizer, world=world)", agreed=True)

    def _own(self, model) -> None:
        if self.built is None or model is not self.built.stage:
            self._stage(None)

    def _stage(self, model) -> None:
        from hvdtrain.pipeline.stage import PipelineStage
        if not isinstance(model, PipelineStage):
            raise UserError(f"this world is a {self.world.stages}-stage pipeline, each rank holding one stage: pass "
                            "the stage hvdtrain.keras.pipeline returned, not the whole model", agreed=True)

    def callbacks(self) -> list:
        return [self.built.balance]   # the stages' measured balance, logged at every epoch end

    def evaluator(self, source, task, split: str = "test", batch: int = 256):
        return serving.PipelineEvaluator(source, self.world, task, split, batch)

    def exact_metrics(self, model, dataset, task, name: str, where: str) -> dict:
        self._stage(model)
        return serving.exact_metrics_through(model, dataset, self.world, task, name, where)

    def outputs(self, model) -> int:
        return model.whole_outputs

    def whole_model(self, model):
        merged = tensor.gathered_slices(self.split, self.world) if self.split else None
        return serving.assemble(self.built, self.world, merged)

    def summary(self, model, global_batch: int) -> dict:
        split = {"tensor": tensor.tensor_summary(self.split, self.world, self.built.built)} if self.split else {}
        return {**super().summary(model, global_batch), "pipeline": self.built.summary(), **split}

    def predict_arrays(self, model, inputs, batch_size: int):
        raise UserError(f"hvdtrain.keras.predict scores with the whole model on every rank, and in this "
                        f"{self.world.stages}-stage pipeline each rank holds one stage: predict with the whole model "
                        "(model.keras, written by run.finish) in a world without stages", agreed=True)

    def load_trained(self, trained):
        return serving.stage_of(trained, self.world)

    def evaluate_trained(self, trained, source, split: str, batch: int) -> dict:
        stage = self.load_trained(trained)
        return serving.PipelineEvaluator(source, self.world, trained.task, split, batch)(stage)

    def predict_trained(self, trained, share, out) -> dict:
        """Each replica's pipeline scores the replica's batches; its last stage writes them."""
        from hvdtrain.inference import write_predictions
        stage = self.load_trained(trained)
        return write_predictions(serving.predictions_through(stage, share, trained.task), share, self.world, out,
                                 trained.class_names, writers=serving.last_stages(range(self.world.size), self.world))


def part_name(stage: int, tensor_rank: int | None = None) -> str:
    """A stage's part of a checkpoint (`stage-<s>`, or `stage-<s>-tensor-<t>` for its tensor slices)."""
    return f"stage-{stage}" if tensor_rank is None else f"stage-{stage}-{tensor.part_name(tensor_rank)}"


def restore_whole(ckpt, model, layout: dict, split: dict | None = None) -> None:
    """A pipeline checkpoint's stages (each from its `stage-<s>/state`) into the whole model; with split layers
    (`split`: the tensor layout), each tensor slice's stages into that slice's split model, then put together."""
    def read(whole, tensor_rank=None):
        _, stage_models = split_plan(whole, layout["stages"], tuple(layout["first_layers"][1:]))
        for s, stage_model in enumerate(stage_models):
            restore_stage(ckpt, stage_model, s, tensor_rank)
    if split:
        tensor.restore_whole(ckpt, model, split, read)
    else:
        read(model)


def restore_stage(ckpt, stage_model, stage: int, tensor_rank: int | None = None) -> None:
    """One stage's trained weights from its part (`hvdtrain serve --stages` loads only its own)."""
    import keras

    class Stage(keras.Model):   # the object path a stage was saved under: model.stage_model
        def __init__(self, stage_model):
            super().__init__()
            self.stage_model = stage_model
    checkpoint.restore(ckpt, Stage(stage_model), part=part_name(stage, tensor_rank))
