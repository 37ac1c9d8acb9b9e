"""Failures provoked for real under horovodrun -np 2: killed and stalled ranks, non-finite loss, stop signals,
kills during checkpoint writes. Each asserts the outcome: exit codes, messages, a bound on time, checkpoints
that still load, and resumed results equal to uninterrupted ones."""
import json
import re
import subprocess
import sys
import time

import pytest

from conftest import (BIN, REPO, ended_by_itself, env, horovodrun, kill_tree, output, rank_pids, start_horovodrun,
                      start_launch, wait_for)
from hvdtrain import checkpoint

HVDTRAIN = [str(BIN / "hvdtrain"), "train"]   # the stack under test (.venv or .venv-tf2.15)
DIGITS = ["--config", str(REPO / "configs/digits.yaml")]


def first_checkpoint(run):
    return wait_for(lambda: checkpoint.latest(run), timeout=120, what="the first checkpoint")


def assert_checkpoint_loads(run):
    import tensorflow as tf
    latest = checkpoint.latest(run)
    assert latest is not None
    reader = tf.train.load_checkpoint(str(latest / "state"))
    assert reader.get_variable_to_shape_map()
    return checkpoint.read_meta(latest)


# How scripts/launch.sh reports rank 1's death by kill -9, in one line (mpirun's box, horovodrun's traceback).
KILLED = {"gloo": r"^launch\.sh: rank 1 exited with code 137; horovodrun ended the job$",
          "mpi": r"^launch\.sh: rank 1 on node \S+ ended on signal 9 \(Killed\); mpirun ended the job$"}


@pytest.mark.parametrize("launcher", ["gloo", "mpi"])
def test_killed_rank_ends_the_job_quickly_and_the_run_resumes(tmp_path, launcher):
    run = tmp_path / "run"
    args = [*HVDTRAIN, *DIGITS, f"--trainer.run_dir={run}", "--trainer.epochs=500", "--trainer.global_batch_size=16"]
    job = start_launch(2, args, launcher)   # as `make train` launches
    try:
        first_checkpoint(run)
        ranks = rank_pids(job, 2)
        subprocess.run(["kill", "-9", str(ranks[1])], check=True)
        out = ended_by_itself(job, 60, "rank 1 was killed")
    finally:
        kill_tree(job)
    assert job.returncode == 128 + 9, out[-3000:]   # the killed rank's code is the job's, under either launcher
    assert re.search(KILLED[launcher], out, re.M) and "Traceback" not in out and "PID" not in out, out[-3000:]
    meta = assert_checkpoint_loads(run)
    resumed = subprocess.run(["horovodrun", "-np", "2", "--gloo", *args[:-2], f"--trainer.epochs={meta['epoch'] + 1}",
                              "--trainer.global_batch_size=16"],
                             cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, output(resumed)
    assert f"({meta['epoch']} of {meta['epoch'] + 1} epochs done)" in resumed.stdout


@pytest.mark.parametrize("launcher", ["gloo", "mpi"])
def test_stalled_rank_is_stopped_within_the_stall_timeout(tmp_path, launcher):
    run = tmp_path / "run"
    job = start_launch(2, [*HVDTRAIN, *DIGITS, f"--trainer.run_dir={run}", "--trainer.epochs=500",
                           "--trainer.global_batch_size=16", "--runtime.stall_timeout_s=10"], launcher)
    try:
        first_checkpoint(run)
        ranks = rank_pids(job, 2)
        subprocess.run(["kill", "-STOP", str(ranks[1])], check=True)  # alive but never joins the next collective
        out = ended_by_itself(job, 90, "rank 1 was stopped")
    finally:
        kill_tree(job)
    assert job.returncode == 4, out[-3000:]   # rank 0's: a lost peer (CollectiveFailure's and the watchdog's code)
    ended = "horovodrun" if launcher == "gloo" else "mpirun"
    assert re.search(rf"^launch\.sh: rank 0 exited with code 4; {ended} ended the job$", out, re.M), out[-3000:]
    lines = [line for line in out.splitlines() if "hvdtrain: error:" in line]   # rank 1 too, if it woke in time
    assert lines and re.match(r"hvdtrain: error: rank 0\b", lines[0]), out[-3000:]   # the first: rank 0's
    assert "made no progress for" in lines[0] or "a collective failed" in lines[0], out[-3000:]
    assert "rerun the same command to resume" in lines[0]
    assert_checkpoint_loads(run)


def test_non_finite_loss_stops_every_rank_at_the_same_step_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    ok = horovodrun(2, [*HVDTRAIN, *DIGITS, f"--trainer.run_dir={run}", "--trainer.epochs=1"])
    assert ok.returncode == 0, output(ok)
    good, completed = checkpoint.latest(run), (run / "summary.json").read_text()
    # Continue with an absurd learning rate: the weights overflow and the loss becomes non-finite in epoch 2.
    bad = horovodrun(2, [*HVDTRAIN, *DIGITS, f"--trainer.run_dir={run}", "--trainer.epochs=3", "--optim.lr=1e12",
                         "--trainer.check_every_steps=1"])
    assert bad.returncode != 0
    text = output(bad)
    errors = [line for line in text.splitlines() if "hvdtrain: error: non-finite loss or weights" in line]
    assert len(errors) == 1, text[-3000:]                       # rank 0 reports once, for everyone
    assert "at epoch 2, step " in errors[0] and "on rank(s) 0, 1;" in errors[0]
    assert "exit with status code 3" in text                    # ranks exit 3 (horovodrun names the first one)
    assert checkpoint.latest(run) == good                       # the last good checkpoint is kept, nothing newer
    assert_checkpoint_loads(run)
    assert (run / "summary.json").read_text() == completed   # the failed run wrote no summary: the last one stands


@pytest.mark.stacks
def test_stop_signal_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    """Bit-for-bit: deterministic ops on CPU, the same batches in the same order, optimizer and LR state restored."""
    epochs = 8   # the stop arrives in epoch 2 or so: the rest is the resumed run's to do
    common = [*HVDTRAIN, *DIGITS, f"--trainer.epochs={epochs}", "--trainer.global_batch_size=16",
              "--runtime.deterministic=true", "--trainer.check_every_steps=3", "--trainer.tensorboard=false"]
    straight = horovodrun(2, [*common, f"--trainer.run_dir={tmp_path / 'straight'}"])
    assert straight.returncode == 0, output(straight)

    run = tmp_path / "interrupted"
    job = start_horovodrun(2, [*common, f"--trainer.run_dir={run}"])
    try:
        first_checkpoint(run)
        subprocess.run(["kill", "-USR1", str(rank_pids(job, 2)[1])], check=True)  # one rank asked: all agree to stop
        out, _ = job.communicate(timeout=120)
    finally:
        kill_tree(job)
    assert job.returncode == 0, out[-3000:]
    stopped = json.loads((run / "summary.json").read_text())
    assert stopped["status"] == "stopped", out[-2000:]
    meta = checkpoint.read_meta(checkpoint.latest(run))
    assert meta["global_step"] == stopped["global_step"] < epochs * (1437 // 16)
    assert meta["step_in_epoch"] % 3 == 0                        # stopped at an agreed check step

    resumed = horovodrun(2, [*common, f"--trainer.run_dir={run}"])
    assert resumed.returncode == 0, output(resumed)
    assert "resuming from" in resumed.stdout
    final = json.loads((run / "summary.json").read_text())
    reference = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert final["status"] == "completed" and final["global_step"] == reference["global_step"]
    assert final["weights_sha256"] == reference["weights_sha256"]   # bit-for-bit equal weights
    assert final["test_accuracy"] == reference["test_accuracy"]
    # The interrupted epoch is marked partial twice (its first part, stopped; its rest, resumed); no other row is.
    import csv
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    partial = [(int(r["epoch"]), int(r["global_step"])) for r in rows if r["partial"] == "1"]
    steps = 1437 // 16
    assert partial == [(meta["epoch"], meta["global_step"]), (meta["epoch"], (meta["epoch"] + 1) * steps)], partial
    assert len(rows) == epochs + 1 and all(int(r["global_step"]) % steps == 0 for r in rows if r["partial"] == "0")
    assert f"(partial epoch: {meta['step_in_epoch']} of {steps} steps" in out
    assert f"(partial epoch: {steps - meta['step_in_epoch']} of {steps} steps" in resumed.stdout


def digits_records(folder, files: int):
    """The digits training and test splits as TFRecord files (round robin): with file-level sharding rank r reads
    files r, r + 2, ..."""
    from hvdtrain.config import DataConfig
    from hvdtrain.data import open_source, write_tfrecords
    for split in ("train", "test"):
        arrays = open_source(DataConfig()).arrays(split)
        (folder / split).mkdir(parents=True)
        write_tfrecords(arrays.x, arrays.y, [str(folder / split / f"part-{i}.tfrecord") for i in range(files)])
    return ["--data.source=tfrecord", f"--data.path={folder / 'train'}", f"--data.test_path={folder / 'test'}",
            "--data.input_shape=[8,8,1]", "--data.shuffle_buffer=64"]


@pytest.mark.parametrize("split", ["train", "test"])
def test_data_that_goes_bad_mid_run_stops_every_rank_with_that_ranks_error(tmp_path, split):
    """Valid at the start, then a file of rank 1's share is cut short while training runs: every rank stops with
    rank 1's data error, naming the file (exit 2), never a hang and never 'a peer died'."""
    run = tmp_path / "run"
    job = start_horovodrun(2, [*HVDTRAIN, *digits_records(tmp_path / "records", 4), f"--trainer.run_dir={run}",
                               "--trainer.epochs=500", "--trainer.global_batch_size=16", "--runtime.stall_timeout_s=60"])
    try:
        first_checkpoint(run)
        victim = tmp_path / "records" / split / ("part-1.tfrecord" if split == "train" else "part-3.tfrecord")
        victim.write_bytes(victim.read_bytes()[:len(victim.read_bytes()) // 2])   # rank 1 reads it (train: file 1;
        out, _ = job.communicate(timeout=180)                                     # test: the second half's block)
    finally:
        kill_tree(job)
    assert job.returncode != 0
    errors = [line for line in out.splitlines() if "hvdtrain: error:" in line]
    assert len(errors) == 1, out[-3000:]                       # agreed: printed once, by rank 0
    assert f"corrupt TFRecord file {victim}: unreadable after record" in errors[0] \
        or f"{victim} held " in errors[0], errors   # cut inside a record, or exactly between two
    assert "(on rank 1)" in errors[0] or "on rank 1" in errors[0]
    assert "a collective failed" not in out and "made no progress" not in out
    assert "exit with status code 2" in out or "Exit code: 2" in out or "exit code 2" in out.lower(), out[-2000:]
    assert_checkpoint_loads(run)


NATIVE_CRASH = """
import ctypes
import hvdtrain.keras as hk

def crash_in_rank_one(world):
    if world.rank == 1:
        ctypes.string_at(0)   # reads address 0 in C, as a crashing native library would
    hk.barrier(world)

crash_in_rank_one(hk.init())
"""


def test_a_native_crash_in_a_rank_prints_its_python_stack_and_ends_the_job(tmp_path):
    # Under MPI: Open MPI installs its own crash handler in MPI_Init unless one is already there, and its trace
    # shows C frames only. hvdtrain's start-up installs Python's first, so the log says where the rank was.
    script = tmp_path / "crash.py"
    script.write_text(NATIVE_CRASH)
    proc = horovodrun(2, [sys.executable, str(script)], "mpi", timeout=180)
    out = re.sub(r"\[\d+,\d+\]<std(?:out|err)>:", "", output(proc))   # mpirun's tags split lines
    assert proc.returncode != 0, out
    assert "Fatal Python error: Segmentation fault" in out, out[-3000:]
    assert 'line 7 in crash_in_rank_one' in out, out[-3000:]


SAVE_LOOP = """
import sys, keras
from hvdtrain import checkpoint
from hvdtrain.rundir import RunDir
run = RunDir(sys.argv[1]).check()
model = keras.Sequential([keras.Input((2048,)), keras.layers.Dense(2048), keras.layers.Dense(10)])
model.compile(keras.optimizers.Adam(), "mse")
model.optimizer.build(model.trainable_variables)
saver = checkpoint.Checkpointer(run, {"signature": checkpoint.signature(model, (2048,), 10, "big")}, keep=2)
for step in range(1, 10**6):
    saver.save(model, checkpoint.Position(step, 0, step), 1)
    print(step, flush=True)
"""


def test_kill_during_checkpoint_writes_leaves_a_loadable_checkpoint(tmp_path):
    run = tmp_path / "run"
    for delay in (0.0, 0.013, 0.029, 0.047):
        writer = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(run)], env=env(), stdout=subprocess.PIPE, text=True)
        try:
            assert writer.stdout.readline().strip()         # at least one checkpoint is complete
            time.sleep(delay)
        finally:
            writer.kill()                                    # SIGKILL, at an arbitrary point of a write
            writer.wait()
        meta = assert_checkpoint_loads(run)
        assert meta["signature"]["model"] == "big"
        assert len(checkpoint.list_checkpoints(run)) <= 3
