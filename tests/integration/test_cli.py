"""The CLI end to end, as a user runs it: files in the run directory, the accuracy bar, resume, clear errors."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import BIN, REPO, env, hvdtrain, output, wait_for

LAUNCH = str(REPO / "scripts/launch.sh")


def launch(np_, args, timeout=300):
    return subprocess.run([LAUNCH, str(np_), "hvdtrain", *args], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def test_default_digits_job_on_two_ranks_reaches_the_accuracy_bar(tmp_path):
    """`make train` runs exactly this (scripts/launch.sh 2 hvdtrain train --config configs/digits.yaml)."""
    run = tmp_path / "run"
    old = os.umask(0o022)   # the usual umask: everything the run writes must then be readable by others
    started = time.monotonic()
    try:
        proc = launch(2, ["train", "--config", "configs/digits.yaml", f"--trainer.run_dir={run}"])
    finally:
        os.umask(old)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, output(proc)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["num_ranks"] == 2 and summary["epochs"] == 30
    assert summary["test_accuracy"] >= 0.95
    assert 0 < summary["wall_seconds"] < seconds   # within the launch the test timed
    # The run directory is complete.
    assert (run / "config.yaml").read_text().startswith("data:")
    assert (run / "model.keras").is_file()
    assert any((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(list((run / "checkpoints").glob("ckpt-*"))) == 3   # keep_checkpoints
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(30))
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "val_top5_accuracy", "samples_per_sec"} <= set(rows[0])
    assert [int(r["global_step"]) for r in rows] == [22 * (e + 1) for e in range(30)] and {r["partial"] for r in rows} == {"0"}
    # samples/s: the epochs after the first (tracing) averaged; each epoch's 22 x 64 examples took less than the run
    speeds = [float(r["samples_per_sec"]) for r in rows]
    assert summary["samples_per_sec"] == pytest.approx(sum(speeds[1:]) / 29)
    assert min(speeds) > 22 * 64 / seconds
    # Files colleagues can read on a shared file system (umask 022 here): not the 0600/0700 of temporary files.
    assert oct((run / "config.yaml").stat().st_mode & 0o777) == oct((run / "summary.json").stat().st_mode & 0o777) == "0o644"
    assert {oct(p.stat().st_mode & 0o777) for p in (run / "checkpoints").iterdir()} == {"0o755"}
    # Rank 0 alone reports: one line per epoch and one final line.
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("epoch 30/30") for line in lines) == 1      # no launcher tag: as the docs show
    assert sum(line.startswith("[hvdtrain] test accuracy") for line in lines) == 1
    assert "oneDNN" not in output(proc) and "absl::InitializeLog" not in output(proc)   # no start-up banners


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory):
    """A 3-epoch digits run in one process, trained once for the tests that read it or continue a copy of it."""
    run = tmp_path_factory.mktemp("three-epochs") / "run"
    proc = hvdtrain(["train", "--config", str(REPO / "configs/digits.yaml"), f"--trainer.run_dir={run}",
                     "--trainer.epochs=3"])
    assert proc.returncode == 0, output(proc)
    return run


def test_model_keras_loads_and_predicts_like_the_summary(three_epochs):
    check = ("import json,sys,numpy as np,keras;from hvdtrain import data;from hvdtrain.config import DataConfig;"
             "m=keras.models.load_model(sys.argv[1]);t=data.open_source(DataConfig()).arrays('test');"
             "acc=float((np.argmax(m.predict(t.x,verbose=0),1)==t.y).mean());"
             "s=json.load(open(sys.argv[2]));assert abs(acc-s['test_accuracy'])<1e-9,(acc,s);print('ok')")
    run = three_epochs
    res = subprocess.run([sys.executable, "-c", check, str(run / "model.keras"), str(run / "summary.json")],
                         env=env(), capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "ok", output(res)


def test_rerun_resumes_and_no_resume_refuses(tmp_path, small_digits, three_epochs):
    shutil.copytree(three_epochs, tmp_path / "run")      # small_digits' run directory, 3 epochs done
    more = hvdtrain(["train", *small_digits[:-1], "--trainer.epochs=4"])
    assert more.returncode == 0, output(more)
    assert "resuming from" in more.stdout and "(3 of 4 epochs done)" in more.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["global_step"] == 4 * (1437 // 64) and summary["epoch"] == 4
    # Run again with nothing left to train: the run's summary.json and model.keras stay as it wrote them.
    written = {name: (tmp_path / "run" / name).read_bytes() for name in ("summary.json", "model.keras")}
    again = hvdtrain(["train", *small_digits[:-1], "--trainer.epochs=4"])
    assert again.returncode == 0, output(again)
    assert "nothing left to train" in again.stdout, output(again)
    assert {name: (tmp_path / "run" / name).read_bytes() for name in written} == written
    refused = hvdtrain(["train", *small_digits, "--no-resume"])
    assert refused.returncode == 2
    assert "already holds checkpoint" in refused.stderr


def test_a_stop_file_is_served_once_and_the_rerun_resumes_to_the_end(tmp_path, small_digits):
    """RUN_DIR/STOP stops the run at an agreed step with a checkpoint, and is removed once that checkpoint is
    written: the same command then resumes and completes instead of stopping again."""
    run, args = tmp_path / "run", ["train", *small_digits[:-1], "--trainer.epochs=20"]
    first = subprocess.Popen([str(BIN / "hvdtrain"), *args], cwd=REPO, env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: any((run / "checkpoints").glob("ckpt-*")) or first.poll() is not None, timeout=240,
                 what="a first checkpoint")
        (run / "STOP").touch()
        log = first.communicate(timeout=240)[0]
    finally:
        first.kill()
    assert first.returncode == 0, log
    stopped = json.loads((run / "summary.json").read_text())
    assert stopped["status"] == "stopped" and stopped["epoch"] < 20, log
    assert not (run / "STOP").exists(), log
    assert f"removed {run}/STOP" in log
    again = hvdtrain(args)
    assert again.returncode == 0, output(again)
    assert "resuming from" in again.stdout and "on request" not in again.stdout, output(again)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 20 * (1437 // 64)


@pytest.mark.parametrize("args, message", [
    (["--trainer.epochz=3"], "unknown config key 'trainer.epochz' (did you mean 'epochs'?)"),
    (["--config", "does/not/exist.yaml"], "config file not found: does/not/exist.yaml"),
    (["--optim.lr=fast"], "optim.lr must be a number, got 'fast'"),
    (["--runtime.expected_ranks=2"], "expects 2 ranks (runtime.expected_ranks) but 1 is running"),
    (["--parallel.pipeline_stages=2"], "parallel.pipeline_stages=2: 2 stages need at least 2 ranks; 1 is running; "
                                       "launch with `scripts/launch.sh 2 hvdtrain ...`"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    proc = hvdtrain(["train", f"--trainer.run_dir={tmp_path / 'run'}", *args])
    assert proc.returncode == 2, output(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hvdtrain: error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


def test_indivisible_batch_stops_both_ranks_with_one_message(tmp_path):
    proc = launch(2, ["train", f"--trainer.run_dir={tmp_path / 'run'}", "--trainer.global_batch_size=63"])
    assert proc.returncode != 0
    text = output(proc)
    assert text.count("trainer.global_batch_size=63 is not divisible by the 2 ranks; use a multiple of 2, e.g. 62 or 64") == 1
    assert "Traceback" not in text
    # mpirun's boxes are one line; rank 0's lines carry no launcher tag
    assert re.search(r"^launch\.sh: rank [01] exited with code 2; mpirun ended the job$", text, re.M), text
    assert "Primary job" not in text and "[1,0]<" not in text


def test_help_and_config_reference():
    assert "pipeline stages, local SGD and federated averaging" in hvdtrain(["--help"]).stdout
    train_help = hvdtrain(["train", "--help"]).stdout
    assert "--section.key=value" in train_help
    for way in ("data parallelism (the default)", "--parallel.pipeline_stages=P", "--trainer.sync=local_sgd",
                "--trainer.sync=fedavg"):
        assert way in train_help, way
    ref = hvdtrain(["config", "--reference"]).stdout
    assert "trainer.global_batch_size" in ref and "HOROVOD_CYCLE_TIME" in ref
    resolved = hvdtrain(["config", "--config", "configs/digits.yaml", "--trainer.epochs=2"]).stdout
    assert "epochs: 2" in resolved


def test_doctor_reports_the_stack_the_build_and_ranks():
    import importlib.metadata
    proc = launch(2, ["doctor"])
    assert proc.returncode == 0, output(proc)
    text = proc.stdout
    tf_version = importlib.metadata.version("tensorflow-cpu")
    assert f"tensorflow   {tf_version} (keras {importlib.metadata.version('keras')})" in text
    stack = "tf2.21: hvdtrain's own Keras 3 layer" if tf_version.startswith("2.21") else "tf2.15: Horovod's Keras 2 layer"
    assert f"stack        {stack}" in text
    assert "horovod      0.28.1 (built from source by scripts/install.sh" in text
    assert "controllers  mpi yes, gloo yes" in text
    assert "Open MPI" in text and "HOROVOD_CYCLE_TIME=" in text
    assert "ranks        2 (mpi controller, launched by mpirun)" in text
    assert "oneDNN" not in output(proc) and "absl::InitializeLog" not in output(proc)   # no start-up banners
