"""The strategy interface, and its first implementation: data parallelism that averages the gradients at every step.

A strategy is how the ranks stay one model. Every strategy answers the same questions, so the trainer, the Keras
API, the loop controller, the session and the commands ask it instead of branching on a mode:

  build_model, optimizer, distribute, prepare   what each rank makes and trains (the model `fit` runs, compiled)
  signature, checkpoint_part                    what a checkpoint must match to be resumed, which part a rank writes
  write_part, restore                           writing that part; restoring, whatever layout wrote the checkpoint
  start, begin, after_step, one_model_after     before the first step (checks, broadcast) and around each step
  callbacks, train                              extra fit callbacks; the loop (fit, unless the strategy has its own)
  evaluator, exact_metrics, whole_model         reading the model: exact evaluation, model.keras's whole model
  describe, summary, memory                     summary.json's entries
  load_trained, evaluate_trained, predict_trained   a trained run read back for `hvdtrain evaluate` and `predict`

The other strategies refine this one (strategies/__init__.py chooses). Collectives in these methods run on every
rank, in the same order.
"""
from __future__ import annotations

from hvdtrain import backend, optim
from hvdtrain.errors import UserError
from hvdtrain.log import get_logger
from hvdtrain.strategies import sharded


class DataParallel:
    """Every rank holds the whole model and reads its own shard; the distributed optimizer averages the gradients over
    the replicas at every optimizer step, so the replicas stay bit-identical. With `shard_state` 1 or 2 (ZeRO) each
    replica holds its range of the optimizer state, and of the averaged gradients at 2 (strategies/sharded.py)."""

    name = "every_step"
    progress_unit = "epoch"
    # Does a global batch hold the same examples whatever the number of ranks (in-memory data), so that a checkpoint
    # may be resumed on another number? strategies.create says, from the data source.
    data_moves = True

    def __init__(self, world, shard_state: int = 0):
        self.world, self.shard_state = world, shard_state
        self.lr_follows_ranks = False   # does the configured learning rate depend on the number of ranks?

    @classmethod
    def from_config(cls, cfg, world, *, source=None, run=None) -> "DataParallel":
        return cls(world, cfg.parallel.shard_state)

    def epoch_steps(self, count) -> int:
        """Steps per epoch: `count()`, the agreed number of per-rank batches (a strategy with epochs of its own
        answers without counting)."""
        return count()

    # ---- what each rank makes and trains -------------------------------------------------------------------------

    def build_model(self, builder):
        """The whole model as this rank makes it."""
        return builder()

    def optimizer(self, optim_cfg, precision: str, bucket_mb: float, steps_per_epoch: int, epochs: int):
        """The configured optimizer (learning rate scaled with the replicas), distributed by `distribute`, loss-scaled
        for mixed_float16 with the skip-a-step decision agreed."""
        base = optim.build_optimizer(optim_cfg, self.world.replicas, steps_per_epoch, epochs)
        self.lr_follows_ranks = optim_cfg.lr_scaling != "none" or optim_cfg.warmup_epochs > 0
        distributed = self.distribute(base, fp16_compression=optim_cfg.fp16_compression,
                                      backward_passes_per_step=optim_cfg.backward_passes_per_step,
                                      sparse_as_dense=optim_cfg.sparse_as_dense, bucket_mb=bucket_mb)
        return backend.loss_scale(distributed) if precision == "mixed_float16" else distributed

    def distribute(self, optimizer, **options):
        """`optimizer`, averaging the gradients over the replicas of this rank's part of the model (with sharded
        state: each replica updating its range)."""
        if self.shard_state:
            return backend.sharded_optimizer(optimizer, stage=self.shard_state, group=self.world.replica_group,
                                             **options)
        return backend.distributed_optimizer(optimizer, group=self.world.replica_group, **options)

    def follow(self, optimizer) -> bool:
        """Shard as `optimizer` does (the Keras API's user chose in hk.distribute); True when that changed."""
        stage = backend.shard_stage(optimizer)
        changed, self.shard_state = stage != self.shard_state, stage
        return changed

    def prepare(self, model, objective, optimizer=None):
        """The model `fit` trains; compiled when `optimizer` is given (the Keras API's user compiles their own)."""
        if optimizer is not None:
            model.compile(optimizer=optimizer, loss=objective.loss(), metrics=objective.metrics(), jit_compile=False)
        return model

    # ---- checkpoints ---------------------------------------------------------------------------------------------

    def signature(self, whole: dict) -> dict:
        """What a checkpoint must match to be resumed: the whole model's signature, and the layout it cannot leave
        (data read from files, each rank its own, cannot move to another number of ranks). `optimizer_shards` only
        says where the optimizer state is: any layout re-shards it."""
        out = dict(whole)
        if not self.data_moves:
            out["file_shards"] = self.world.replicas
        if self.shard_state:
            out["optimizer_shards"] = self.world.replicas
        return out

    @property
    def weights_part(self) -> tuple[str | None, bool]:
        """(the part of a checkpoint holding this rank's weights, None for the whole; whether this rank writes it)."""
        return None, self.world.is_chief

    @property
    def checkpoint_part(self) -> tuple[str | None, bool]:
        """(the part of a checkpoint this rank writes and restores, None for the whole; whether it writes it): the
        weights part, or with sharded state every replica's optimizer shard beside it."""
        part, writes = self.weights_part
        return (sharded.part_name(part, self.world.replica), True) if self.shard_state else (part, writes)

    def write_part(self, model, directory) -> None:
        """This rank's part of a checkpoint being written into `directory` (see checkpoint.PartedCheckpointer)."""
        part, writes = self.checkpoint_part
        if self.shard_state:
            sharded.write(model, directory, *self.weights_part, self.world.replica)
        elif writes:
            checkpoint.write_state(model, checkpoint.state_path(directory, part))

    def restore(self, ckpt, meta: dict, model) -> None:
        """This rank's part of checkpoint `ckpt` into the model and its optimizer; optimizer state sharded by another
        layout (or whole, into sharded state) is re-sharded to this one."""
        if self.shard_state or sharded.wrote_shards(meta):
            sharded.restore(ckpt, meta, model, self.weights_part[0])
        else:
            checkpoint.restore(ckpt, model, model.optimizer, self.checkpoint_part[0])
        written = meta.get("num_ranks", self.world.size)
        if written != self.world.size and self.lr_follows_ranks:
            get_logger(self.world.rank).info(
                f"the learning rate follows the number of ranks (optim.lr_scaling, optim.warmup_epochs' start): "
                f"written on {written} ranks, this run continues with the schedule of {self.world.size}")

    # ---- around the steps ----------------------------------------------------------------------------------------

    def start(self, model, elastic: bool = False) -> None:
        """Before the first step: refuse what would silently train unsynchronised replicas or crash later, then every
        replica starts from its group's first replica's state."""
        check_compiled(model, self.world, elastic)
        backend.build_optimizer(model.optimizer, model.trainable_variables)
        backend.broadcast_variables(list(model.variables) + backend.replicated_variables(model.optimizer),
                                    name="hvdtrain.start", group=self.world.replica_group)

    def begin(self, done: int) -> None:
        """Before the first step of a fit, `done` steps into the run."""

    def after_step(self, model, done: int) -> bool:
        """After `done` steps: this strategy's part of the step; True when it averaged the weights just now."""
        return False

    def one_model_after(self, done: int) -> bool:
        """Are the replicas one model after `done` steps (so they may agree on stops and checkpoint)?"""
        return True

    def check(self, model) -> None:
        """Refuse a model this strategy cannot train (before a resume), in one agreed line."""

    def callbacks(self) -> list:
        """Keras callbacks of this strategy's own, after the loop's."""
        return []

    def train(self, session, model, batches_from, evaluate=None, callbacks=(), diagnose=None, **fit_kwargs) -> None:
        """The loop from the session's position to its end: Keras's fit in whole epochs, driven by the session's loop
        controller (`evaluate`: exact metrics at epoch ends; `callbacks`: the user's, after everything else)."""
        from hvdtrain.loop.fit import FitHooks, fit_segments
        hooks = [FitHooks(session.loop(evaluate, unit=self.progress_unit))]
        fit_segments(model, batches_from, session, hooks + self.callbacks() + list(callbacks), diagnose=diagnose,
                     **fit_kwargs)

    # ---- reading the model ---------------------------------------------------------------------------------------

    def evaluator(self, source, task, split: str = "test", batch: int = 256):
        """model -> exact metrics of a split of the data (None without that split); a collective."""
        from hvdtrain.inference import Evaluator
        return Evaluator(source, self.world, task, split, batch)

    def exact_metrics(self, model, dataset, task, name: str, where: str) -> dict:
        """Exact metrics of `dataset` (this rank's batches of it) with `model`; a collective."""
        from hvdtrain.inference import exact_metrics
        return exact_metrics(model, dataset, self.world, task, name, where)

    def outputs(self, model) -> int:
        """The whole model's outputs (its task's classes)."""
        return int(model.output_shape[-1])

    def whole_model(self, model):
        """The whole trained model, for model.keras, on rank 0 (others may get None); a collective."""
        return model

    def describe(self) -> dict:
        """summary.json's `sync`: how the replicas of each part of the model stay one (every step, here)."""
        return {"mode": "every_step", **({"shard_state": self.shard_state} if self.shard_state else {})}

    def summary(self, model, global_batch: int) -> dict:
        """This strategy's own entries of summary.json; a collective."""
        return {"global_batch_size": global_batch, "optimizer_steps": int(model.optimizer.iterations.numpy())}

    def memory(self, model) -> dict:
        """summary.json's `memory` entry of this rank: the bytes of weights, gradients and optimizer state it holds."""
        return backend.held_bytes(model)

    # ---- a trained run, for evaluate and predict ------------------------------------------------------------------

    def load_trained(self, trained):
        """The model this rank scores with."""
        return trained.model

    def evaluate_trained(self, trained, source, split: str, batch: int) -> dict:
        share = source.eval_share(self.data_view(), split, batch)
        return self.exact_metrics(self.load_trained(trained), share.dataset, trained.task, "hvdtrain.evaluate",
                                  f"{split} data")

    def predict_arrays(self, model, inputs, batch_size: int):
        """The Keras API's data-parallel predict: outputs in input order on every rank."""
        from hvdtrain.inference import predict_ordered
        return predict_ordered(model, inputs, self.world, batch_size)

    def predict_trained(self, trained, share, out) -> dict:
        from hvdtrain.inference import predict_to_file
        return predict_to_file(trained.model, share, self.world, out, trained.task, trained.input_shape,
                               trained.class_names)

    def data_view(self):
        """The world the data sees (every rank of a replica reads the replica's batches)."""
        return self.world.data_view()


def check_compiled(model, world, elastic: bool) -> None:
    """An optimizer that does not average over the replicas, or an XLA-compiled step, refused in one line."""
    if (world.replicas > 1 or elastic) and not backend.is_distributed(model.optimizer):
        over = f"{world.size} ranks" if world.replicas == world.size else f"{world.replicas} replicas of its part"
        raise UserError(f"model.optimizer ({type(model.optimizer).__name__}) does not average gradients over the "
                        f"{over}, so they would drift apart: compile with hvdtrain.keras.distribute(optimizer"
                        f"{'' if world.replicas == world.size else ', world=world'})", agreed=True)
    if backend.uses_xla(model):
        raise UserError("the model was compiled with jit_compile=True (Keras 3 does so by default on GPUs): "
                        "Horovod's all-reduce has no XLA kernel; compile with jit_compile=False", agreed=True)

