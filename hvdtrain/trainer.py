"""`hvdtrain train` inside every rank. Construction builds everything once, in this order: the world, the run
directory check, the data (every input validated by the rank that reads it, under one agreement), the agreed step
count, the model and its distributed optimizer, the session (checkpoints, callbacks) and the resume. `fit()` is the
loop; `summarize()` the end. Static and elastic training are two loop strategies, not flags.
"""
from __future__ import annotations

import dataclasses

from hvdtrain import callbacks as cb
from hvdtrain import backend, checkpoint, config, data, federated, models, optim, pipeline
from hvdtrain import world as worlds
from hvdtrain.errors import DataError, UserError
from hvdtrain.inference import Evaluator
from hvdtrain.log import counted, get_logger
from hvdtrain.pipeline import serving
from hvdtrain.rundir import STOP_FILE, RunDir
from hvdtrain.session import Session, fit_segments
from hvdtrain.sync import Synchronizer, SyncPlan
from hvdtrain.tasks import Task


class Trainer:
    def __init__(self, cfg: config.Config, stop: cb.StopRequest | None = None):
        self.cfg = cfg
        self.world = worlds.start(cfg.runtime, stages=cfg.parallel.pipeline_stages)
        self.data_world = self.world.data_view()   # pipeline stages read their replica's batches
        self.fedavg = cfg.trainer.sync == "fedavg"
        self.loop = ElasticLoop() if cfg.trainer.elastic else FederatedLoop() if self.fedavg else StaticLoop()
        self.run = RunDir(cfg.trainer.run_dir)
        self.log = get_logger(self.world.rank)
        try:
            self._build(stop or cb.StopRequest(stop_file=self.run / STOP_FILE))
        except UserError:
            self.run.discard_if_fresh()   # nothing half-written: a failed start leaves no empty run directory
            raise
        if self.world.is_chief:
            self.run.write_config(cfg)
            self.run.write_classes(self.source.class_names())

    def _build(self, stop: cb.StopRequest) -> None:
        cfg, world, together = self.cfg, self.world, self.loop.together
        self.source = data.open_source(cfg.data)   # reads nothing yet
        together(lambda: self.loop.check_launch(cfg, world, self.source), "hvdtrain.check_world")
        together(self.run.check, "hvdtrain.run_dir")
        self.log.info(f"{world.describe()}; run directory {self.run}")
        for split in data.SPLITS:
            if self.source.has_split(split):
                self.source.adopt(split, self.loop.gather(lambda s=split: self.source.validate(self.data_world, s),
                                                          f"hvdtrain.validate.{split}"))
        self.task = Task.from_config(cfg.data, cfg.trainer.top_k)
        self.steps = 1 if self.fedavg else self._agreed_steps(together)   # fedavg: a round per epoch
        shape = self.source.example_shape()
        build = (lambda: models.build_model(cfg.model, shape, self.task.outputs))
        self.model = together(lambda: pipeline.build_whole(build, world, cfg.parallel.stage_only),
                              "hvdtrain.pipeline.whole") if cfg.parallel.pipelined else build()
        signature = checkpoint.signature(self.model, shape, self.task.outputs, cfg.model.name)
        plan = SyncPlan.from_config(cfg.trainer, self.steps, cfg.optim.backward_passes_per_step)
        sync = Synchronizer.for_plan(plan, world, cfg.optim.fp16_compression)
        if self.fedavg:   # clients train alone; the rounds average (federated.py)
            self.shares = together(lambda: federated.client_shares(cfg, self.source, self.run, world),
                                   "hvdtrain.fedavg.clients")
            optimizer = optim.optimizer_with(cfg.optim, cfg.optim.lr)
        else:
            optimizer = optim.distributed_optimizer(cfg.optim, world.replicas, self.steps, cfg.trainer.epochs,
                                                    cfg.runtime.precision, cfg.runtime.bucket_mb,
                                                    world.replica_group, sync.switch)
        self.pipeline = None
        if cfg.parallel.pipelined:
            self.pipeline = together(lambda: pipeline.build(cfg, world, self.model, self.task, self.log, self.run),
                                     "hvdtrain.pipeline.build")
            signature["pipeline"] = self.pipeline.layout()
            self.model = self.pipeline.stage
            self.model.compile(optimizer=optimizer, jit_compile=False)
        else:
            self.model.compile(optimizer=optimizer, loss=self.task.loss(), metrics=self.task.metrics(),
                               jit_compile=False)
        meta = {"data_seed": cfg.data.seed, "config": cfg.to_dict(), "classes": self.source.class_names()}
        self.session = Session(world, self.run, steps_per_epoch=self.steps, epochs=cfg.trainer.epochs,
                               global_batch=cfg.trainer.global_batch_size, options=cb.Options.from_config(cfg),
                               stop=stop, meta=meta, elastic=cfg.trainer.elastic, sync=sync)
        together(lambda: self.session.resume(self.model, signature, cfg.trainer.resume), "hvdtrain.resume")
        self.evaluate = self._evaluator(world)

    def own_callbacks(self) -> list:
        """After the session's: the pipeline's measured balance (its epoch-end line follows the epoch's line)."""
        return [] if self.pipeline is None else [self.pipeline.balance]

    def _evaluator(self, world):
        if self.pipeline is not None:
            return serving.PipelineEvaluator(self.source, world, self.task, "test")
        return Evaluator(self.source, world, self.task, "test")

    def _agreed_steps(self, together) -> int:
        """The same number on every rank: the MIN of what each shard can feed (uneven counts make Horovod hang)."""
        local = together(lambda: self.source.local_steps(self.data_world, self.cfg.trainer.global_batch_size),
                         "hvdtrain.steps")
        steps = self.loop.min_over_ranks(local)
        if steps == 0:
            raise DataError(f"a rank's share of the training data has fewer than one per-rank batch of examples "
                            f"({self.cfg.trainer.global_batch_size} // {self.data_world.size}); lower "
                            "trainer.global_batch_size or add data", agreed=True)
        return steps

    def batches_from(self, first_epoch: int, epochs: int, skip_steps: int):
        return self.source.train_batches(self.data_world, self.cfg.trainer.global_batch_size, self.steps, first_epoch,
                                         epochs, skip_steps)

    def rebind(self, world, position: checkpoint.Position) -> None:
        """After an elastic reset: the new world wherever it is held (session, evaluation), at the committed position."""
        config.check_world(self.cfg, world.size)
        self.world = self.data_world = world   # elastic worlds are never pipelined
        self.session.rebind(world, position)
        self.evaluate = self._evaluator(world)

    def fit(self) -> dict:
        self.loop.run(self)
        return self.summarize()

    def summarize(self) -> dict:
        extra = {}
        if self.pipeline is not None:
            extra["pipeline"] = self.pipeline.summary()
        if self.fedavg:
            extra["fedavg"] = {**dataclasses.asdict(self.cfg.fedavg), "per_round": self.cfg.fedavg.per_round,
                               "partition": self.cfg.data.partition}
        summary = self.session.finish(self.model, self.evaluate, extra)
        if summary["status"] == "completed":
            whole = self.model if self.pipeline is None else serving.assemble(self.pipeline, self.world)
            if self.world.is_chief:
                self.run.export_model(whole)
                self.log.info(_result_line(summary, self.task))
        return summary


def _result_line(summary: dict, task: Task) -> str:
    """The last line of a completed run. A rerun of a finished run trains no step: it says so instead of 0 samples/s."""
    ranks = counted(summary["num_ranks"], "rank")
    trained = summary["train_loss"] is not None
    examples = summary.get("test_examples")
    if examples is None:
        done = f"train loss {summary['train_loss']:.4f}" if trained else "nothing left to train"
        return f"done: {done} ({ranks}, no held-out split)"
    head = task.headline
    speed = f"{summary['samples_per_sec']:,.0f} samples/s" if trained else "nothing left to train"
    return (f"test {head} {summary[f'test_{head}']:.4f}  test loss {summary['test_loss']:.4f}  ({examples} held-out "
            f"examples, {ranks}, {speed})")


class StaticLoop:
    """A fixed world: every check is agreed by all ranks; fit from the resume position to the end."""

    @staticmethod
    def together(fn, name):
        return backend.agree_on_errors(fn, name)

    @staticmethod
    def gather(fn, name):
        return backend.gather_agreed(fn, name)

    @staticmethod
    def min_over_ranks(value: int) -> int:
        return int(backend.allreduce_min([value], "hvdtrain.agreed_steps")[0])

    @staticmethod
    def check_launch(cfg, world, source) -> None:
        config.check_world(cfg, world.size)

    def run(self, trainer: Trainer) -> None:
        callbacks = trainer.session.callbacks(evaluate=trainer.evaluate) + trainer.own_callbacks()
        fit_segments(trainer.model, trainer.batches_from, trainer.session, callbacks,
                     diagnose=lambda: trainer.source.diagnose(trainer.data_world, "train"))


class FederatedLoop(StaticLoop):
    """Federated averaging: rounds of simulated clients instead of Keras epochs (federated.py)."""

    def run(self, trainer: Trainer) -> None:
        with trainer.session.guard([]):
            federated.Rounds(trainer).run()


class ElasticLoop:
    """Horovod Elastic: after a worker leaves or joins, every worker restarts `train` from the last commit with the
    new world size. Checks stay local (a joining worker must not run collectives before Horovod's sync; every worker
    reads the same in-memory data), and a global batch holds the same examples whatever the size."""

    @staticmethod
    def together(fn, name):
        return fn()

    @staticmethod
    def gather(fn, name):
        return [fn()]

    @staticmethod
    def min_over_ranks(value: int) -> int:
        return value

    @staticmethod
    def check_launch(cfg, world, source) -> None:
        config.check_world(cfg, world.size)
        if not backend.launched_elastic():
            raise UserError("trainer.elastic=true needs Horovod's elastic launcher: horovodrun --gloo --min-np 1 "
                            "--max-np N --host-discovery-script scripts/discover-hosts.sh hvdtrain train --elastic ...")
        if not source.elastic:
            raise UserError("elastic training supports in-memory sources (digits, synthetic, npz): file shards and "
                            "step counts depend on the number of ranks; convert the data to .npz or train without --elastic")

    def run(self, trainer: Trainer) -> None:
        model, session = trainer.model, trainer.session
        start = session.progress.position
        state = backend.elastic_state(lambda: model.variables + model.optimizer.variables, epoch=start.epoch,
                                   step_in_epoch=start.step_in_epoch, global_step=start.global_step)

        @backend.elastic_run
        def train(state):
            trainer.rebind(worlds.current(), checkpoint.Position(state.epoch, state.step_in_epoch, state.global_step))
            get_logger(trainer.world.rank).info(
                f"elastic: {trainer.world.size} rank(s) from epoch {state.epoch + 1}, step {state.step_in_epoch} "
                f"(global step {state.global_step})")
            fit_segments(model, trainer.batches_from, session, session.callbacks(trainer.evaluate, state))
        train(state)
