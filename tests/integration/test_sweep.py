"""`hvdtrain sweep` end to end on this machine: real trials under horovodrun -np 2, the files a sweep leaves, the best
configuration reproduced by `hvdtrain train`, a driver killed mid-trial and rerun, pruning through RUN/STOP, and the
bad space files that are refused before any trial runs."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time

import psutil
import pytest
import yaml

from conftest import BIN, REPO, env, output, wait_for

HVDTRAIN = str(BIN / "hvdtrain")
LAUNCH = str(REPO / "scripts/launch.sh")
# Every trial: digits, deterministic ops (so a rerun of the best configuration gives the same numbers), no TensorBoard.
BASE = ["--config", str(REPO / "configs/digits.yaml"), "--trainer.tensorboard=false", "--runtime.deterministic=true",
        "--trainer.progress=epoch", "--trainer.global_batch_size=64"]
LR_WARMUP = "optim.lr: {log_uniform: [0.01, 0.3]}\noptim.warmup_epochs: {uniform: [0, 1]}\n"
# Hang guard only (the machine is shared and slow); nothing asserts on durations.
SWEEP_TIMEOUT = 3600


def sweep(args, timeout=SWEEP_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([HVDTRAIN, "sweep", *args], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def start_sweep(args, log) -> subprocess.Popen:
    """The driver in the background, in a session of its own, its output in a file."""
    return subprocess.Popen([HVDTRAIN, "sweep", *args], cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def rows(out) -> list[dict]:
    return list(csv.DictReader((out / "trials.csv").open()))


def summary(out, number: int) -> dict:
    return json.loads((out / "trials" / f"{number:04d}" / "summary.json").read_text())


def metric_rows(out, number: int) -> int:
    path = out / "trials" / f"{number:04d}" / "metrics.csv"
    return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0


def signal_session(sid: int, sig: int) -> int:
    """Send `sig` to every process of one session (a trial's launcher and ranks), by process id."""
    found = 0
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                p.send_signal(sig)
                found += 1
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    return found


def trial_session(out, number: int) -> int:
    return int((out / "trials" / f"{number:04d}" / "trial.pid").read_text())


def test_three_trial_sweep_finds_a_best_config_that_train_reproduces(tmp_path):
    space, out = tmp_path / "space.yaml", tmp_path / "sweep"
    space.write_text(LR_WARMUP)
    args = [*BASE, "--trainer.epochs=3", "--space", str(space), "--trials", "3", "--output", str(out),
            "--ranks-per-trial", "2"]
    started = time.monotonic()
    proc = sweep(args)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, output(proc)

    table = rows(out)
    assert [r["trial"] for r in table] == ["0", "1", "2"]
    assert [r["status"] for r in table] == ["completed"] * 3, table
    assert len({(r["optim.lr"], r["optim.warmup_epochs"]) for r in table}) == 3   # three different trials
    assert set(table[0]) >= {"test_accuracy", "optim.lr", "optim.warmup_epochs", "wall_seconds", "samples_per_sec"}
    for r in table:
        s = summary(out, int(r["trial"]))
        assert s["status"] == "completed" and s["num_ranks"] == 2 and s["epochs"] == 3
        assert float(r["test_accuracy"]) == s["test_accuracy"]
        assert float(r["samples_per_sec"]) == round(s["samples_per_sec"], 1)   # the trial's, as it reported it
        # the trial as the driver timed it: its training inside, and inside the sweep the test timed
        assert s["wall_seconds"] <= float(r["wall_seconds"]) + 0.05 < seconds
        # the trial trained with exactly the sampled values
        trained = yaml.safe_load((out / "trials" / f"{int(r['trial']):04d}" / "config.yaml").read_text())
        assert trained["optim"]["lr"] == float(r["optim.lr"])
        assert trained["optim"]["warmup_epochs"] == float(r["optim.warmup_epochs"])
        assert trained["trainer"]["run_dir"] == str(out / "trials" / f"{int(r['trial']):04d}")
    best = max(table, key=lambda r: (float(r["test_accuracy"]), -int(r["trial"])))
    assert f"best: trial {best['trial']}, test_accuracy {float(best['test_accuracy']):.4f}" in proc.stdout
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    best_cfg = yaml.safe_load((out / "best.yaml").read_text())
    assert best_cfg["optim"]["lr"] == float(best["optim.lr"])
    assert best_cfg["optim"]["warmup_epochs"] == float(best["optim.warmup_epochs"])
    assert best_cfg["trainer"]["run_dir"] == str(out / "best") and best_cfg["trainer"]["epochs"] == 3

    # The same command again: the sweep is complete, nothing runs, the results are the same.
    again = sweep(args, timeout=600)
    assert again.returncode == 0, output(again)
    assert "3 of 3 trials done" in again.stdout and " started " not in again.stdout
    assert rows(out) == table

    # best.yaml as it is: the same accuracy and the very same weights as the best trial.
    train = subprocess.run([LAUNCH, "2", "hvdtrain", "train", "--config", str(out / "best.yaml")], cwd=REPO, env=env(),
                           capture_output=True, text=True, timeout=1800)
    assert train.returncode == 0, output(train)
    reproduced, found = json.loads((out / "best" / "summary.json").read_text()), summary(out, int(best["trial"]))
    assert reproduced["status"] == "completed" and reproduced["num_ranks"] == 2
    assert reproduced["test_accuracy"] == found["test_accuracy"]
    assert reproduced["weights_sha256"] == found["weights_sha256"]


def test_killed_sweep_continues_without_losing_or_repeating_a_trial(tmp_path):
    """Driver 1 is SIGKILLed while trial 0 trains (the trial keeps running); driver 2 follows it, starts trial 1 and is
    SIGKILLed together with trial 1's processes (as in a crash of the machine); driver 3 relaunches trial 1, which
    resumes from its checkpoint, then runs trial 2. A trial is held (SIGSTOP) while its driver is killed, so short
    trials cannot end before the test has done what it checks."""
    space, out = tmp_path / "space.yaml", tmp_path / "sweep"
    space.write_text(LR_WARMUP)
    epochs = 6
    args = [*BASE, f"--trainer.epochs={epochs}", "--space", str(space), "--trials", "3", "--output", str(out),
            "--ranks-per-trial", "2"]

    with open(tmp_path / "driver1.log", "w") as log:
        first = start_sweep(args, log)
    wait_for(lambda: metric_rows(out, 0) >= 1 or first.poll() is not None, timeout=1800, what="trial 0 to train")
    assert signal_session(trial_session(out, 0), signal.SIGSTOP) >= 1   # held until driver 2 has found it running
    first.kill()
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL, (tmp_path / "driver1.log").read_text()
    assert not (out / "trials/0000/summary.json").exists()   # killed mid-trial
    assert not (out / "trials/0001").exists()

    with open(tmp_path / "driver2.log", "w") as log:
        second = start_sweep(args, log)
    wait_for(lambda: "following it" in (tmp_path / "driver2.log").read_text() or second.poll() is not None,
             timeout=600, what="driver 2 to find trial 0 running")
    signal_session(trial_session(out, 0), signal.SIGCONT)
    wait_for(lambda: metric_rows(out, 1) >= 1 or second.poll() is not None, timeout=1800, what="trial 1 to train")
    sid = trial_session(out, 1)
    signal_session(sid, signal.SIGSTOP)
    second.kill()
    second.wait(timeout=60)
    log2 = (tmp_path / "driver2.log").read_text()
    assert second.returncode == -signal.SIGKILL, log2
    assert signal_session(sid, signal.SIGKILL) >= 1, log2    # the trial was running: its launcher and ranks are gone now
    assert not (out / "trials/0001/summary.json").exists()
    assert "trial 0 is still running" in log2 and "following it" in log2, log2
    assert "trial 0 completed" in log2 and "trial 1 started" in log2, log2

    third = sweep(args)
    assert third.returncode == 0, output(third)
    assert "trial 1 relaunched (it resumes from its checkpoint)" in third.stdout, third.stdout
    assert "trial 0 " not in third.stdout.split("trial  status")[0], third.stdout   # trial 0 was left alone
    table = rows(out)
    assert [r["trial"] for r in table] == ["0", "1", "2"]
    assert [r["status"] for r in table] == ["completed"] * 3, table
    assert len({(r["optim.lr"], r["optim.warmup_epochs"]) for r in table}) == 3
    # Trial 0 trained once, under the first driver; trial 1 trained twice, the second time from its checkpoint.
    log0 = (out / "trials/0000/train.log").read_text()
    log1 = (out / "trials/0001/train.log").read_text()
    assert log0.count("[hvdtrain] 2 rank(s)") == 1 and "resuming from" not in log0
    assert log1.count("[hvdtrain] 2 rank(s)") == 2 and f"resuming from {out}/trials/0001/checkpoints/ckpt-" in log1
    for number in range(3):
        s = summary(out, number)
        assert s["status"] == "completed" and s["global_step"] == epochs * (1437 // 64)
        assert float(table[number]["test_accuracy"]) == s["test_accuracy"]


def test_side_by_side_trials_pause_on_ctrl_c_and_resume_when_rerun(tmp_path):
    """--parallel 2 runs two 1-rank trials at once; Ctrl-C (SIGINT) stops them at an agreed step with a checkpoint
    (RUN/STOP, recorded "paused" in RUN/trial.stop) and the driver exits 130; the same command continues them from
    their checkpoints. Where the trials are when the pause arrives is the test's doing (a 1-rank digits trial trains
    its 12 epochs in seconds, so either could end before it sees the request): each is held (SIGSTOP) from its start
    and let go once the driver has asked both to stop, so both are paused, at their first agreed step (10)."""
    space, out = tmp_path / "space.yaml", tmp_path / "sweep"
    space.write_text(LR_WARMUP)
    args = [*BASE, "--trainer.epochs=12", "--space", str(space), "--trials", "3", "--output", str(out),
            "--ranks-per-trial", "1", "--parallel", "2", "--slots", "2"]
    with open(tmp_path / "driver1.log", "w") as log:
        first = start_sweep(args, log)
    held = []
    try:
        for number in (0, 1):
            pid_file = out / "trials" / f"{number:04d}" / "trial.pid"
            wait_for(lambda: pid_file.exists() or first.poll() is not None, timeout=600, what=f"trial {number} to start")
            held.append(trial_session(out, number))
            assert signal_session(held[-1], signal.SIGSTOP) >= 1, (tmp_path / "driver1.log").read_text()
            time.sleep(0.5)
            signal_session(held[-1], signal.SIGSTOP)   # and the trainer, if its wrapper started it just before
        first.send_signal(signal.SIGINT)
        requested = [out / "trials" / f"{number:04d}" / "trial.stop" for number in (0, 1)]
        wait_for(lambda: all(r.exists() for r in requested) or first.poll() is not None, timeout=120,
                 what="the driver to ask both trials to stop")
    finally:
        for sid in held:   # let go, also when the test failed: nothing is left stopped
            signal_session(sid, signal.SIGCONT)
    assert first.wait(timeout=900) == 130, (tmp_path / "driver1.log").read_text()
    log1 = (tmp_path / "driver1.log").read_text()
    assert "trial 0 started" in log1 and "trial 1 started" in log1 and "trial 2" not in log1, log1
    assert "interrupted: rerun the same command to continue" in log1, log1
    for number in (0, 1):
        run, stopped = out / "trials" / f"{number:04d}", summary(out, number)
        assert (stopped["status"], stopped["global_step"]) == ("stopped", 10), (number, log1)
        assert (run / "checkpoints" / f"ckpt-{stopped['global_step']:08d}").is_dir()   # at the agreed step
        assert not (run / "STOP").exists()   # served by the trainer after the checkpoint
        assert (run / "trial.stop").read_text().startswith("paused by hvdtrain sweep")
    assert [r["status"] for r in rows(out)] == ["running", "running"]

    again = sweep(args)
    assert again.returncode == 0, output(again)
    for number in (0, 1):
        assert f"trial {number} relaunched (it resumes from its checkpoint)" in again.stdout, again.stdout
    assert "trial 2 started" in again.stdout
    assert [r["status"] for r in rows(out)] == ["completed"] * 3
    threads = max(1, len(os.sched_getaffinity(0)) // 2)   # side by side, each trial gets its share of the cores
    for number in range(3):
        run = out / "trials" / f"{number:04d}"
        assert summary(out, number)["status"] == "completed" and summary(out, number)["num_ranks"] == 1
        assert yaml.safe_load((run / "config.yaml").read_text())["runtime"]["intra_op_threads"] == threads
        assert not (run / "STOP").exists() and not (run / "trial.stop").exists()
        assert ("resuming from" in (run / "train.log").read_text()) == (number < 2)


def test_a_hopeless_trial_is_pruned_and_stopped_at_an_agreed_step(tmp_path):
    """Trial 0 (lr 0.05) completes; trial 1 (lr 1e-5 learns nothing) falls below the median at epoch 1: the driver
    creates its RUN/STOP, both ranks stop at one step, checkpoint, and the trial is PRUNED."""
    space, out = tmp_path / "space.yaml", tmp_path / "sweep"
    space.write_text("optim.lr: {log_uniform: [1.0e-5, 0.1]}\n"
                     "pruning: {startup_trials: 1, warmup_epochs: 0}\n"
                     "enqueue:\n  - {optim.lr: 0.05}\n  - {optim.lr: 1.0e-5}\n")
    proc = sweep([*BASE, "--trainer.epochs=12", "--space", str(space), "--trials", "2", "--output", str(out),
                  "--ranks-per-trial", "2"])
    assert proc.returncode == 0, output(proc)
    table = rows(out)
    assert [(r["trial"], r["status"], r["optim.lr"]) for r in table] == [("0", "completed", "0.05"),
                                                                         ("1", "pruned", "1e-05")], table
    assert table[1]["note"] == "pruned at epoch 1" and table[1]["test_accuracy"] == ""
    assert "trial 1 pruned at epoch 1 (val_accuracy" in proc.stdout
    run = out / "trials/0001"
    assert (run / "trial.stop").read_text().startswith("pruned by hvdtrain sweep: epoch 1:")
    assert not (run / "STOP").exists()   # served: the trainer removed it after the checkpoint
    stopped = json.loads((run / "summary.json").read_text())
    assert stopped["status"] == "stopped" and stopped["num_ranks"] == 2
    assert stopped["global_step"] < 12 * (1437 // 64)
    log = (run / "train.log").read_text()
    assert "stopped at epoch" in log and f"on request (stop file {run}/STOP)" in log
    assert (run / "checkpoints" / f"ckpt-{stopped['global_step']:08d}").is_dir()   # checkpoint at the agreed step
    assert not (out / "trials/0000/STOP").exists() and summary(out, 0)["status"] == "completed"
    # best.yaml is the completed trial's configuration
    assert yaml.safe_load((out / "best.yaml").read_text())["optim"]["lr"] == 0.05


# Every mistake in a space has its unit test (tests/unit/test_sweep_space.py); here the command: a space error, the
# --ranks-per-trial it is checked against, and the command's own checks, each refused before anything is created.
@pytest.mark.parametrize("space, extra, message", [
    ("optim.lrr: {log_uniform: [1.0e-3, 1.0]}", [],
     "space.yaml: unknown config key 'optim.lrr' (did you mean 'lr'?)"),
    ("trainer.global_batch_size: {choice: [63, 100]}", ["--ranks-per-trial", "3"],
     "space.yaml: trainer.global_batch_size {choice: [63, 100]} includes 100: trainer.global_batch_size=100 is not "
     "divisible by the 3 ranks; use a multiple of 3, e.g. 99 or 102"),
    ("optim.lr: [1.0e-3, 1.0", [], "space.yaml is not valid YAML at line 2, column 1: expected ',' or ']'"),
    ("optim.lr: {log_uniform: [1.0e-3, 1.0]}", ["--optim.lr=0.1"],
     "optim.lr is both swept (space.yaml) and set on the command line; drop one of them"),
    ("optim.lr: {log_uniform: [1.0e-3, 1.0]}", ["--ranks-per-trial", "2", "--parallel", "CORES"],
     "--parallel CORES x 2 rank(s) per trial needs 2xCORES cores but this machine has CORES; lower --parallel"),
], ids=["unknown-key", "batch-vs-ranks", "yaml", "swept-and-overridden", "too-many-ranks"])
def test_bad_space_is_refused_with_one_line_before_any_trial(tmp_path, space, extra, message):
    cores = len(os.sched_getaffinity(0))
    extra = [str(cores) if a == "CORES" else a for a in extra]
    message = message.replace("2xCORES", str(2 * cores)).replace("CORES", str(cores))
    (tmp_path / "space.yaml").write_text(space + "\n")
    out = tmp_path / "sweep"
    proc = sweep(["--config", str(REPO / "configs/digits.yaml"), "--space", str(tmp_path / "space.yaml"),
                  "--trials", "2", "--output", str(out), *extra], timeout=120)
    assert proc.returncode == 2, output(proc)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvdtrain: error: ") and message in lines[0], proc.stderr
    assert not out.exists()   # refused before anything was created, let alone run
