"""The sweep driver: checks everything, then asks Optuna for trials, runs each as an ordinary `hvdtrain train` job
(locally or on Slurm), follows its metrics.csv for the pruner, and tells Optuna the outcome by trial number.

All Optuna calls happen here, in the main thread; trials are separate processes (or Slurm jobs) followed by polling.
The driver never imports TensorFlow or Horovod.

Restart semantics (the driver may be killed at any moment; rerunning the same command continues):
- the study (DIR/study.journal) holds every trial; a trial is never asked twice, finished trials are kept;
- a trial left RUNNING is looked up by its recorded process group (local) or job id (Slurm): still running -> the
  new driver follows it; ended -> its exit code and summary.json give the outcome; vanished without an exit code
  -> it is launched again in its own run directory, where `hvdtrain train` resumes from its last checkpoint;
- a trial.stop with "pruned" means the pruning decision was made: the trial ends as pruned, never relaunched;
  one with "paused" (a sweep interrupted with Ctrl-C) is removed and the trial continues. The trial's STOP (the
  request to the trainer) is removed by the trainer once served, so the driver reads its own record, trial.stop.
"""
from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from hvdtrain import config as configs
from hvdtrain.errors import NonFiniteLoss, UserError
from hvdtrain.rundir import write_atomic
from hvdtrain.sweep import results
from hvdtrain.sweep.local import LOST, RUNNING, LocalRunner
from hvdtrain.sweep.space import Space, first_values, load_space, override_text, with_values
from hvdtrain.sweep.study import DriverLock, SweepStudy
from hvdtrain.sweep.trial import PAUSED, PRUNED, MetricMissing, TrialDir

POLL_S = {"local": 0.5, "slurm": 3.0}
EXIT_BAD_INPUT, EXIT_NONFINITE = UserError.exit_code, NonFiniteLoss.exit_code
BASE_YAML = "base.yaml"


def say(text: str) -> None:
    print(f"[sweep] {text}", flush=True)


@dataclass
class Active:
    """A trial this driver follows."""
    trial: object               # optuna.trial.Trial
    dir: TrialDir
    values: dict                # the trial's config values (section.key -> value)
    epochs: int
    record: dict = field(default_factory=dict)   # where its processes are (pid/session or Slurm job id)
    reported: set = field(default_factory=set)   # epochs already told to Optuna
    failures: int = 0           # launches that ended with an unexpected exit code
    prune_epoch: int | None = None

    @property
    def number(self) -> int:
        return self.trial.number


class Abort(UserError):
    """Something every trial would hit (a config the trainer refuses, a missing metric): the sweep stops."""

    def __init__(self, message: str):
        super().__init__(message, agreed=True)


# ------------------------------------------------------------------ entry point

def sweep(args, overrides) -> int:
    from hvdtrain.sweep import slurm as slurm_runner
    ranks = slurm_runner.ranks(args) if args.slurm else args.ranks_per_trial
    if args.slurm and args.ranks_per_trial not in (None, ranks):
        raise UserError(f"--ranks-per-trial {args.ranks_per_trial} differs from the {ranks} rank(s) of each Slurm job "
                        "(--nodes x --tasks-per-node or --gpus-per-node); drop --ranks-per-trial")
    ranks = ranks or 1
    base = configs.load_config(args.config, overrides)
    if base.trainer.resume == "never" or base.trainer.elastic:
        raise UserError("the base config sets trainer.resume=never or trainer.elastic=true; trials must be static runs "
                        "that can resume from their checkpoints (drop those settings)")
    space = load_space(args.space, base, ranks)
    swept_and_set = [k for k in space.params if any(o.split("=", 1)[0] == f"--{k}" for o in overrides)]
    if swept_and_set:
        raise UserError(f"{swept_and_set[0]} is both swept ({Path(args.space).name}) and set on the command line; "
                        "drop one of them")
    slots = args.slots or len(os.sched_getaffinity(0))
    if not args.slurm and args.parallel * ranks > slots:
        raise UserError(f"--parallel {args.parallel} x {ranks} rank(s) per trial needs {args.parallel * ranks} cores but "
                        f"this machine has {slots}; lower --parallel (or pass --slots N to oversubscribe)")
    out = Path(args.output).resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create --output {out} ({exc.strerror}); choose a writable directory") from None

    with DriverLock(out):
        settings = {"format": 1, "base": _without_run_dir(base), "space": space.to_dict(), "ranks_per_trial": ranks,
                    "backend": "slurm" if args.slurm else "local"}
        study = SweepStudy(out, space, settings)
        cwd = Path(study.study.user_attrs.get("cwd") or os.getcwd())
        if "cwd" not in study.study.user_attrs:
            study.study.set_user_attr("cwd", str(cwd))   # relative paths in the config are relative to it, always
        base_yaml = out / BASE_YAML
        text = "# written by hvdtrain sweep: the config of every trial before its swept values (--config + overrides)\n" \
               + base.to_yaml()
        if not base_yaml.is_file() or base_yaml.read_text() != text:
            write_atomic(base_yaml, text)
        if args.slurm:
            runner = slurm_runner.SlurmRunner(args, out, args.parallel, cwd)
            runner.check(base_yaml, [override_text(k, v) for k, v in first_values(space).items()])
        else:
            runner = LocalRunner(ranks, slots, args.parallel, cwd)
        driver = Driver(out, study, runner, space, base, args.trials, args.retries, base_yaml, ranks)
        try:
            code = driver.run()
        finally:
            results.write_csv(out, study, space)
        return results.finish(out, study, space, base, ranks, code)


def _without_run_dir(cfg: configs.Config) -> dict:
    d = cfg.to_dict()
    d["trainer"].pop("run_dir", None)
    return d


# ------------------------------------------------------------------ the loop

class Driver:
    def __init__(self, out: Path, study: SweepStudy, runner, space: Space, base: configs.Config, n_trials: int,
                 retries: int, base_yaml: Path, ranks: int):
        self.out, self.study, self.runner, self.space, self.base = out, study, runner, space, base
        self.n_trials, self.retries, self.base_yaml, self.ranks = n_trials, retries, base_yaml, ranks
        self.active: list[Active] = []
        self.poll_s = POLL_S[runner.kind]
        self.interrupted = 0
        pruning = space.pruning
        metric = space.objective.metric
        self.epoch_metric = pruning.metric if pruning else ("val_" + metric[5:] if metric.startswith("test_") else None)

    # ---------------------------------------------------------------- run

    def run(self) -> int:
        """Returns 0 when the sweep has its trials, 130 when interrupted (the trials continue when rerun)."""
        self._start_line()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.recover()
            while True:
                if self.interrupted:
                    return self._interrupt()
                self.fill()
                if not self.active:
                    return 0
                self.poll_all()
                self._sleep(self.poll_s)
        except Abort:
            self._pause_all("the sweep stopped on an error")
            raise
        except KeyboardInterrupt:
            self._left_running()
            return 130
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _start_line(self) -> None:
        trials = self.study.trials()
        done = sum(t.state.is_finished() for t in trials)
        running = len(self.study.running())
        p = self.space.pruning
        pruning = f"median pruner on {p.metric} after {p.startup_trials} trial(s), from epoch {p.warmup_epochs + 1}" \
            if p else "no pruning"
        state = f"{done} of {self.n_trials} trials done" + (f", {running} running" if running else "")
        say(f"{self.out}: {state}; {self.runner.describe()}; objective {self.space.objective.metric} "
            f"({self.space.objective.direction}); {pruning}; trial logs in trials/NNNN/{self.runner.logs}")

    def _on_signal(self, signum, frame) -> None:
        self.interrupted += 1
        if self.interrupted == 1:
            say(f"{signal.Signals(signum).name}: stopping; again to leave the trials running")
        else:
            raise KeyboardInterrupt

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.interrupted and time.monotonic() < end:
            time.sleep(min(0.1, end - time.monotonic()) if end > time.monotonic() else 0)

    # ---------------------------------------------------------------- trials in and out

    def recover(self) -> None:
        """Follow, finish or relaunch the trials an earlier driver left RUNNING."""
        for frozen in self.study.running():
            trial = self.study.reattach(frozen)
            active = self._active(trial, frozen.params)
            active.record = dict(frozen.user_attrs.get("run") or {})
            active.reported = set(frozen.intermediate_values)
            active.failures = int(frozen.user_attrs.get("failures", 0))
            if active.dir.stop_reason() == PRUNED:
                active.prune_epoch = frozen.user_attrs.get("pruned_epoch") or max(active.reported, default=0)
            recorded = dict(active.record)
            state, _ = self.runner.state(active.dir, active.record)
            if active.record != recorded:   # found by the runner (a job submitted just before a driver died)
                trial.set_user_attr("run", active.record)
            self.active.append(active)
            if state == RUNNING:
                say(f"trial {active.number} is still running ({self.runner.where(active.record)}): following it")
            elif state == LOST and not active.record:
                say(f"trial {active.number} was never started: starting it")
                self.launch(active)
            # ended or vanished: poll_all() reads its outcome or relaunches it

    def fill(self) -> None:
        while not self.interrupted and len(self.active) < self.runner.parallel and self.study.started() < self.n_trials:
            trial = self.study.ask()
            active = self._active(trial, trial.params)
            trial.set_user_attr("run_dir", str(active.dir.path.relative_to(self.out)))
            self.active.append(active)
            self.launch(active)

    def _active(self, trial, optuna_params: dict) -> Active:
        values = self.space.config_values(optuna_params)
        cfg = with_values(self.base, values)
        return Active(trial=trial, dir=TrialDir(self.out, trial.number), values=values, epochs=cfg.trainer.epochs)

    def train_args(self, active: Active) -> list[str]:
        return ["--config", str(self.base_yaml), *self.runner.extra_overrides(self.base),
                *(override_text(k, v) for k, v in active.values.items()),
                override_text("trainer.run_dir", str(active.dir.path))]

    def launch(self, active: Active) -> None:
        relaunch = bool(active.record) or active.dir.path.joinpath("checkpoints").is_dir()
        active.dir.clear_pause()
        active.record = self.runner.launch(active.dir, self.train_args(active))
        active.trial.set_user_attr("run", active.record)
        shown = " ".join(override_text(k, v)[2:] for k, v in active.values.items())
        what = "relaunched (it resumes from its checkpoint)" if relaunch else "started"
        say(f"trial {active.number} {what} ({self.runner.where(active.record)}): {shown}")

    # ---------------------------------------------------------------- following trials

    def poll_all(self) -> None:
        for active in list(self.active):
            self.report(active)
            state, code = self.runner.state(active.dir, active.record)
            if state == RUNNING:
                continue
            self.report(active)   # the rows written just before it ended
            try:
                finished = self.finish(active, state, code)
            except Abort:
                self.active.remove(active)
                raise
            if finished:
                self.active.remove(active)
                self.runner.forget(active.number)
                results.write_csv(self.out, self.study, self.space)

    def report(self, active: Active) -> None:
        """Tell Optuna each newly finished epoch, one at a time, asking the pruner after each (so the decision does not
        depend on how often the driver looks)."""
        if self.epoch_metric is None:
            return
        try:
            values = active.dir.epoch_values(self.epoch_metric)
        except MetricMissing as exc:
            if self.space.pruning:
                raise Abort(f"{exc}; set pruning.metric in {Path(self.space.path).name} to one of its columns") from None
            return
        for epoch in sorted(values):
            if epoch in active.reported:
                continue
            active.trial.report(values[epoch], epoch)
            active.reported.add(epoch)
            if (self.space.pruning and active.prune_epoch is None and epoch < active.epochs
                    and active.trial.should_prune()):
                active.prune_epoch = epoch
                active.trial.set_user_attr("pruned_epoch", epoch)
                active.dir.request_stop(PRUNED, f"epoch {epoch}: {self.epoch_metric} {values[epoch]:.4f} is worse "
                                                "than the median of earlier trials")
                say(f"trial {active.number} pruned at epoch {epoch} ({self.epoch_metric} {values[epoch]:.4f}): "
                    "stopping it at an agreed step")

    def finish(self, active: Active, state: str, code: int | None) -> bool:
        """The outcome of a trial whose processes ended; False when it was launched again instead."""
        from hvdtrain.sweep.slurm import CANCELLED
        number, trial, d = active.number, active.trial, active.dir
        if active.prune_epoch is not None or d.stop_reason() == PRUNED:
            epoch = active.prune_epoch or max(active.reported, default=0)
            self._note(trial, f"pruned at epoch {epoch}")
            self.study.prune(trial)
            say(f"trial {number} pruned (stopped at an agreed step; its run directory holds the checkpoint)")
            return True
        if state == LOST:
            say(f"trial {number} ended without an exit code ({self.runner.where(active.record)} is gone)")
            return self._again(active)
        summary = d.summary() or {}
        if code == 0 and summary.get("status") == "completed":
            metric = self.space.objective.metric
            value = summary.get(metric)
            if value is None:
                self._note(trial, f"summary.json has no {metric}")
                self.study.fail(trial)
                have = ", ".join(k for k in sorted(summary) if isinstance(summary[k], (int, float)))
                raise Abort(f"trial {number}'s summary.json has no {metric} (it has {have}); choose one of those as "
                            f"the objective metric in {Path(self.space.path).name}")
            if not math.isfinite(float(value)):
                self._note(trial, f"{metric} is {value}")
                self.study.fail(trial)
                say(f"trial {number} failed: {metric} is {value}")
                return True
            self._note(trial, "")
            self.study.complete(trial, float(value))
            say(f"trial {number} completed: {metric} {float(value):.4f}")
            return True
        if code == 0:   # stopped at an agreed step: paused by an interrupted sweep, or signalled by someone
            why = "was paused" if d.stop_reason() == PAUSED else \
                f"stopped before its end ({summary.get('status', 'no summary.json')})"
            say(f"trial {number} {why}: it continues from its checkpoint")
            return self._again(active, count=summary.get("status") != "stopped")
        error = d.error_line()
        if code == EXIT_BAD_INPUT:
            self._note(trial, f"refused: {error}")
            self.study.fail(trial)
            raise Abort(f"trial {number} refused its config: {error or 'exit code 2'} (log: {d.logs()})")
        if code == EXIT_NONFINITE:
            self._note(trial, "non-finite loss or weights (exit 3)")
            self.study.fail(trial)
            say(f"trial {number} failed: non-finite loss or weights (exit 3); optim.lr too high?")
            return True
        if code == CANCELLED:
            self._note(trial, "job cancelled")
            self.study.fail(trial)
            say(f"trial {number} failed: its job was cancelled")
            return True
        say(f"trial {number} ended with exit code {code}" + (f": {error}" if error else "") + f" (log: {d.logs()})")
        return self._again(active, count=True)

    def _again(self, active: Active, count: bool = False) -> bool:
        """Launch a trial again (it resumes from its checkpoint), unless it has failed too often."""
        if count:
            active.failures += 1
            active.trial.set_user_attr("failures", active.failures)
            if active.failures > self.retries:
                self._note(active.trial, f"failed {active.failures} times; see {active.dir.logs()}")
                self.study.fail(active.trial)
                say(f"trial {active.number} failed {active.failures} times: giving up on it (--retries {self.retries})")
                return True
        if self.interrupted:
            return False   # left RUNNING; the next driver continues it
        self.launch(active)
        return False

    @staticmethod
    def _note(trial, text: str) -> None:
        trial.set_user_attr("note", text)

    # ---------------------------------------------------------------- stopping the driver

    def _interrupt(self) -> int:
        self._pause_all("the sweep was interrupted")
        say("interrupted: rerun the same command to continue")
        return 130

    def _pause_all(self, why: str) -> None:
        """Local trials stop at an agreed step with a checkpoint (trial.stop and STOP "paused"), then the driver exits;
        the next driver continues them. Slurm jobs are independent of the driver: they go on."""
        if not self.active:
            return
        if self.runner.kind == "slurm":
            self._left_running()
            return
        for active in self.active:
            if active.dir.stop_reason() is None:
                active.dir.request_stop(PAUSED, why)
        say(f"waiting for {len(self.active)} trial(s) to stop at an agreed step and checkpoint "
            "(Ctrl-C again to leave them running)")
        try:
            while any(self.runner.state(a.dir, a.record)[0] == RUNNING for a in self.active):
                time.sleep(0.2)
        except KeyboardInterrupt:
            self._left_running()
            return
        for active in self.active:   # one that reached its end before it saw the request has nothing to continue
            if (active.dir.summary() or {}).get("status") == "completed":
                active.dir.clear_pause()

    def _left_running(self) -> None:
        running = [a for a in self.active if self.runner.state(a.dir, a.record)[0] == RUNNING]
        if running:
            where = ", ".join(f"trial {a.number} ({self.runner.where(a.record)})" for a in running)
            say(f"left running: {where}; rerun the same command to follow them")
