"""`hvdtrain train` inside every rank. Construction builds everything once, in this order: the world, the run
directory check, the data (every input validated by the rank that reads it, under one agreement), the agreed step
count, the strategy (strategies/: how the ranks stay one model), the model and its optimizer as the strategy makes
them, the session (checkpoints, the loop) and the resume. `fit()` runs the strategy's loop; `summarize()` the end.
Static and elastic training are two launch modes, not flags.
"""
from __future__ import annotations

from hvdtrain import backend, checkpoint, config, data, models, strategies
from hvdtrain import world as worlds
from hvdtrain.errors import DataError, UserError
from hvdtrain.log import counted, get_logger
from hvdtrain.loop.fit import FitHooks, fit_segments
from hvdtrain.loop.progress import Options
from hvdtrain.loop.stop import StopRequest
from hvdtrain.rundir import STOP_FILE, RunDir
from hvdtrain.session import Session
from hvdtrain.tasks import Task


class Trainer:
    def __init__(self, cfg: config.Config, stop: StopRequest | None = None):
        self.cfg = cfg
        self.world = worlds.start(cfg.runtime, stages=cfg.parallel.pipeline_stages, tensor=cfg.parallel.tensor_parallel)
        self.launch = Elastic() if cfg.trainer.elastic else Static()
        self.run = RunDir(cfg.trainer.run_dir)
        self.log = get_logger(self.world.rank)
        try:
            self._build(stop or StopRequest(stop_file=self.run / STOP_FILE))
        except UserError:
            self.run.discard_if_fresh()   # nothing half-written: a failed start leaves no empty run directory
            raise
        if self.world.is_chief:
            self.run.write_config(cfg)
            self.run.write_classes(self.source.class_names())

    def _build(self, stop: StopRequest) -> None:
        cfg, world, together = self.cfg, self.world, self.launch.together
        self.source = data.open_source(cfg.data)   # reads nothing yet
        together(lambda: self.launch.check(cfg, world, self.source), "hvdtrain.check_world")
        together(self.run.check, "hvdtrain.run_dir")
        self.log.info(f"{world.describe()}; run directory {self.run}")
        readers = world.data_view()   # pipeline stages and tensor slices read their replica's batches
        for split in data.SPLITS:
            if self.source.has_split(split):
                self.source.adopt(split, self.launch.gather(lambda s=split: self.source.validate(readers, s),
                                                            f"hvdtrain.validate.{split}"))
        self.task = Task.from_config(cfg.data, cfg.trainer.top_k)
        self.strategy = strategies.create(cfg, world, source=self.source, run=self.run)
        self.steps = self.strategy.epoch_steps(lambda: self._agreed_steps(together, readers))
        shape = self.source.example_shape()
        whole = together(lambda: self.strategy.build_model(
            lambda: models.build_model(cfg.model, shape, self.task.outputs)), "hvdtrain.model")
        signature = checkpoint.signature(whole, shape, self.task.outputs, cfg.model.name)
        optimizer = self.strategy.optimizer(cfg.optim, cfg.runtime.precision, cfg.runtime.bucket_mb, self.steps,
                                            cfg.trainer.epochs)
        self.model = together(lambda: self.strategy.prepare(whole, self.task, optimizer), "hvdtrain.prepare")
        meta = {"data_seed": cfg.data.seed, "config": cfg.to_dict(), "classes": self.source.class_names()}
        self.session = Session(world, self.run, self.strategy, steps_per_epoch=self.steps, epochs=cfg.trainer.epochs,
                               global_batch=cfg.trainer.global_batch_size, options=Options.from_config(cfg),
                               stop=stop, meta=meta, elastic=cfg.trainer.elastic)
        together(lambda: self.session.resume(self.model, signature, cfg.trainer.resume), "hvdtrain.resume")
        self.evaluate = self.strategy.evaluator(self.source, self.task, "test")

    def _agreed_steps(self, together, readers) -> int:
        """The same number on every rank: the MIN of what each shard can feed (uneven counts make Horovod hang)."""
        local = together(lambda: self.source.local_steps(readers, self.cfg.trainer.global_batch_size), "hvdtrain.steps")
        steps = self.launch.min_over_ranks(local)
        if steps == 0:
            raise DataError(f"a rank's share of the training data has fewer than one per-rank batch of examples "
                            f"({self.cfg.trainer.global_batch_size} // {readers.size}); lower "
                            "trainer.global_batch_size or add data", agreed=True)
        return steps

    def batches_from(self, first_epoch: int, epochs: int, skip_steps: int):
        return self.source.train_batches(self.world.data_view(), self.cfg.trainer.global_batch_size, self.steps,
                                         first_epoch, epochs, skip_steps)

    def diagnose(self):
        return self.source.diagnose(self.world.data_view(), "train")

    def rebind(self, world, position: checkpoint.Position) -> None:
        """After an elastic reset: the new world wherever it is held (session, evaluation), at the committed position."""
        config.check_world(self.cfg, world.size)
        self.world = world
        self.session.rebind(world, position)
        self.evaluate = self.strategy.evaluator(self.source, self.task, "test")

    def fit(self) -> dict:
        self.launch.run(self)
        return self.summarize()

    def summarize(self) -> dict:
        summary = self.session.finish(self.model, self.evaluate)
        if summary["status"] == "completed":
            whole = self.strategy.whole_model(self.model)
            if self.world.is_chief and not self.session.trained_nothing:
                self.run.export_model(whole)
            self.log.info(_result_line(summary, self.task))
        return summary


def _result_line(summary: dict, task: Task) -> str:
    """The last line of a completed run (a rerun of a finished run repeats the run's own result)."""
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


class Static:
    """A fixed world: every check is agreed by all ranks; the strategy's loop from the resume position to the end."""

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
    def check(cfg, world, source) -> None:
        config.check_world(cfg, world.size)

    def run(self, trainer: Trainer) -> None:
        trainer.strategy.train(trainer.session, trainer.model, trainer.batches_from, trainer.evaluate,
                               diagnose=trainer.diagnose)


class Elastic:
    """Horovod Elastic (data-parallel, every step): after a worker leaves or joins, every worker restarts `train` from
    the last commit with the new world size. Checks stay local (a joining worker must not run collectives before
    Horovod's sync; every worker reads the same in-memory data), and a global batch holds the same examples whatever
    the size."""

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
    def check(cfg, world, source) -> None:
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
            fit_segments(model, trainer.batches_from, session, [FitHooks(session.loop(trainer.evaluate, state))])
        train(state)
