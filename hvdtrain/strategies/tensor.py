"""Tensor parallelism and hybrid data x tensor parallelism (parallel.tensor_parallel = T > 1, no pipeline stages):
each tensor group of T consecutive ranks holds one replica of the model, its split layers' weights divided among
them (hvdtrain/tensor/: the split layers, the plan, the model made tensor-parallel and back); each part (a tensor
slice) is averaged over its D replicas. The layers that are not split are replicated in the tensor group, where
their gradients are already equal (Megatron's argument), so only the data group averages. This module wires it into
a run; the pipeline strategy applies the same split before it cuts stages (P x T)."""
from __future__ import annotations

from hvdtrain import backend, checkpoint
from hvdtrain import pipeline as pipelines
from hvdtrain.errors import UserError
from hvdtrain.strategies.base import DataParallel


class Tensor(DataParallel):
    name = "tensor"

    def __init__(self, world, plan: dict | None = None, stage_only: bool = True):
        """`plan`: parallel.tensor_plan (empty: automatic); `stage_only`: ranks other than 0 make only their slices."""
        super().__init__(world)
        if world.tensor == 1:
            raise UserError("hvdtrain.keras.tensor_parallel needs tensor-parallel ranks: start with "
                            "hvdtrain.keras.init(tensor_parallel=T), T > 1", agreed=True)
        self.plan, self.stage_only = dict(plan or {}), stage_only
        self.split = None   # tensor.shard.SplitModel, once prepared
        self.whole = None   # rank 0: the whole model, for model.keras
        self.built = 0      # parameters of the whole model this rank made

    @classmethod
    def from_config(cls, cfg, world, *, source=None, run=None) -> "Tensor":
        return cls(world, cfg.parallel.tensor_plan, cfg.parallel.stage_only)

    @classmethod
    def reader(cls, world) -> "Tensor":
        """For reading a trained model through the tensor groups (evaluate, predict), not for training."""
        return cls(world)

    def build_model(self, builder):
        """The whole model; on ranks other than 0 without its weights (see pipeline.build_whole)."""
        return pipelines.build_whole(builder, self.world, self.stage_only)

    def prepare(self, model, objective, optimizer=None):
        """This rank's tensor-parallel model of the whole `model`: its split layers hold this rank's slices of the
        whole model's initial weights; its other layers are the whole model's."""
        self.split = split_of(model, self.plan, self.world)
        pipelines.make_only(self.split.model)
        self.whole = model if self.world.is_chief else None
        self.built = pipelines.held_parameters(model) + self.split.parameters()[0]
        if optimizer is not None:
            self.split.model.compile(optimizer=optimizer, loss=objective.loss(), metrics=objective.metrics(),
                                     jit_compile=False)
        return self.split.model

    def signature(self, whole: dict) -> dict:
        return {**super().signature(whole), "tensor": layout(self.split)}   # another layout is refused

    @property
    def weights_part(self):
        return part_name(self.world.tensor_rank), self.world.replica == 0   # each slice's first replica writes it

    def check(self, model) -> None:
        """The model must be this strategy's, its optimizer averaging over the slice's replicas only."""
        if self.split is None or model is not self.split.model:
            raise UserError(f"this world splits layers over {self.world.tensor} ranks: pass the model "
                            "hvdtrain.keras.tensor_parallel returned, not the whole model", agreed=True)
        optimizer = model.optimizer   # averaging over all ranks would add up different slices' gradients
        if backend.is_distributed(optimizer) and backend.averaging_group(optimizer) != self.world.replica_group:
            raise UserError("a tensor-parallel model's optimizer must average over the replicas of its slice only: "
                            "compile it with hvdtrain.keras.distribute(optimizer, world=world)", agreed=True)

    def whole_model(self, model):
        """The whole model with every slice put together, on rank 0: the first replica's tensor group gathers its
        slices there."""
        merged = gathered_slices(self.split, self.world)
        if self.world.is_chief:
            for name, weights in merged.items():
                self.whole.get_layer(name).set_weights(weights)
        return self.whole

    def summary(self, model, global_batch: int) -> dict:
        return {**super().summary(model, global_batch), "tensor": tensor_summary(self.split, self.world, self.built)}

    def load_trained(self, trained):
        """The trained whole model split as its checkpoint's plan says (automatic for another layout)."""
        found = checkpoint.read_meta(trained.ckpt).get("signature", {}).get("tensor") or {}
        plan = found["plan"] if found.get("degree") == self.world.tensor else self.plan
        self.split = split_of(trained.model, plan, self.world)
        return self.split.model

    def predict_trained(self, trained, share, out) -> dict:
        from hvdtrain.inference import predict_to_file
        return predict_to_file(self.load_trained(trained), share, self.world, out, trained.task, trained.input_shape,
                               trained.class_names)


def split_of(whole, plan: dict, world):
    """This rank's tensor-parallel model of `whole` (tensor.shard.SplitModel) for `plan` (empty: automatic), checked
    against the model; its deferred weights not yet made (pipeline.make_only makes them)."""
    from hvdtrain import runtime
    from hvdtrain.tensor import plan as plans
    from hvdtrain.tensor.shard import split_model
    if runtime.keras_major() < 3:
        raise UserError("parallel.tensor_parallel > 1 needs the Keras 3 stack (TensorFlow >= 2.16): the TF 2.15 stack "
                        "trains data-parallel only", agreed=True)
    checked = plans.resolve(whole, plan, world.tensor)
    return split_model(whole, checked, world.tensor, world.tensor_rank, world.tensor_group, pipelines.initial_value)


def part_name(tensor_rank: int) -> str:
    """A tensor slice's part of a checkpoint."""
    return f"tensor-{tensor_rank}"


def layout(split) -> dict:
    """What a checkpoint of a tensor-parallel model must match to be resumed: the degree and the plan."""
    return {"degree": split.tensor, "plan": dict(split.plan)}


def gathered_slices(split, world) -> dict:
    """{split layer name: whole weights} on the first replica's first tensor rank of each stage, {} elsewhere: the
    first replica's tensor groups gather their slices, then every rank waits for them (a collective: Horovod shuts
    down for all once one rank has left, so no rank may leave while a group still gathers)."""
    merged = {}
    if world.replica == 0:
        gathered = backend.allgather_object(split.slices(), "hvdtrain.tensor.slices", group=world.tensor_group)
        merged = split.merged(gathered) if world.tensor_rank == 0 else {}
    backend.barrier()
    return merged


def tensor_summary(split, world, built: int) -> dict:
    """summary.json's `tensor` entry (a collective): the layout, each rank's parameters in split layers and in all,
    and what it made of the whole model."""
    mine = (*split.parameters(), built)
    split_params, held, made = zip(*backend.allgather_object(mine, "hvdtrain.tensor.summary"))
    return {**layout(split), "replicas": world.replicas, "split_parameters": list(split_params),
            "parameters": list(held), "built_parameters": list(made)}


def restore_whole(ckpt, model, found: dict, read=None) -> None:
    """A tensor-parallel checkpoint's slices into the whole model: slice t read into rank t's split model by
    `read(split_model, t)` (default: from its `tensor-<t>/state`; a pipeline's reads its stages' parts)."""
    from hvdtrain.tensor.shard import merged, split_model
    read = read or (lambda split, t: checkpoint.restore(ckpt, split, part=part_name(t)))
    slices = []
    for t in range(found["degree"]):
        split = split_model(model, found["plan"], found["degree"], t)
        read(split.model, t)
        slices.append(split.slices())
    for name, axes in split.axes.items():
        model.get_layer(name).set_weights(merged(axes, [s[name] for s in slices]))
