"""examples/keras_resumable.py, a plain Keras 3 script using hvdtrain.keras, under horovodrun -np 2: preemption with
a bit-exact resume, a killed or stalled rank ending the job in bounded time with its checkpoint intact, and uneven
file shards running the same number of steps on every rank. (The same script on Slurm: tests/slurm/.)"""
import csv
import json
import subprocess

import pytest

from conftest import (BIN, REPO, ended_by_itself, example_digits, kill_tree, rank_pids, start_horovodrun,
                      start_launch, wait_for)
from hvdtrain import checkpoint

EXAMPLE = [str(BIN / "python"), str(REPO / "examples/keras_resumable.py")]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return example_digits(tmp_path_factory.mktemp("digits-records"))


def example(run, digits, *extra):
    return [*EXAMPLE, "--run-dir", str(run), "--data", str(digits), "--deterministic", *extra]


def finished(job, timeout):
    return ended_by_itself(job, timeout, "it started")


@pytest.mark.stacks
def test_uneven_shards_run_the_same_steps_and_a_stop_resumes_bit_exactly(tmp_path, digits):
    # Rank 0 reads files 0 and 2 (1,137 examples), rank 1 file 1 (300): 300 // 8 = 37 steps for both, not 142 and 37.
    steps, epochs = 37, 4
    args = ("--epochs", str(epochs), "--global-batch", "16")
    straight = start_horovodrun(2, example(tmp_path / "straight", digits, *args))
    try:
        out = finished(straight, 600)
    finally:
        kill_tree(straight)
    assert straight.returncode == 0, out[-3000:]
    reference = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert reference["status"] == "completed"
    assert reference["global_step"] == epochs * steps == reference["optimizer_steps"]

    run = tmp_path / "stopped"
    run.mkdir()
    (run / "STOP").touch()   # there from the start: the stop lands at the first agreed check, mid-epoch (step 10)
    job = start_horovodrun(2, example(run, digits, *args))
    try:
        out = finished(job, 300)
    finally:
        kill_tree(job)
    assert job.returncode == 0, out[-3000:]
    stopped = json.loads((run / "summary.json").read_text())
    assert stopped["status"] == "stopped" and stopped["global_step"] == 10, out[-2000:]
    assert "stopped at epoch 1, step 10 on request (stop file" in out
    assert checkpoint.read_meta(checkpoint.latest(run))["global_step"] == 10
    assert "(partial epoch: 10 of 37 steps" in out

    (run / "STOP").unlink(missing_ok=True)
    again = start_horovodrun(2, example(run, digits, *args))
    try:
        out = finished(again, 600)
    finally:
        kill_tree(again)
    assert again.returncode == 0, out[-3000:]
    assert f"resuming from {run}/checkpoints/ckpt-{10:08d}" in out
    final = json.loads((run / "summary.json").read_text())
    assert final["status"] == "completed" and final["global_step"] == reference["global_step"]
    assert final["weights_sha256"] == reference["weights_sha256"]          # bit for bit
    assert final["test_accuracy"] == reference["test_accuracy"]
    # The rest of the interrupted epoch, then whole epochs at the true boundaries, as `hvdtrain train` resumes.
    assert out.count("(partial epoch:") == 1 and "(partial epoch: 27 of 37 steps" in out, out[-3000:]
    rows, straight_rows = metrics(run), metrics(tmp_path / "straight")
    assert [(r["epoch"], r["global_step"]) for r in rows if r["partial"] == "1"] == [("0", "10"), ("0", "37")]
    assert [r for r in rows if r["partial"] == "0"] == straight_rows[1:]   # the same losses and held-out metrics


def metrics(run) -> list[dict]:
    """metrics.csv's rows without the timing columns (they differ from run to run)."""
    with (run / "metrics.csv").open() as f:
        return [{k: v for k, v in row.items() if "seconds" not in k and "samples_per_sec" not in k}
                for row in csv.DictReader(f)]


# The job's exit code and scripts/launch.sh's line (Gloo): the killed rank's 128 + 9, or rank 0's 4 (a lost peer).
ENDED = {"kill": (137, "launch.sh: rank 1 exited with code 137; horovodrun ended the job"),
         "stall": (4, "launch.sh: rank 0 exited with code 4; horovodrun ended the job")}


@pytest.mark.parametrize("how", ["kill", "stall"])
def test_a_killed_or_stalled_rank_ends_the_job_with_a_clear_line_and_a_loadable_checkpoint(tmp_path, digits, how):
    run = tmp_path / "run"
    job = start_launch(2, example(run, digits, "--epochs", "500", "--stall-timeout", "10"), "gloo")
    try:
        wait_for(lambda: checkpoint.latest(run), 300, "the first checkpoint")
        victim = rank_pids(job, 2)[1]
        subprocess.run(["kill", "-9" if how == "kill" else "-STOP", str(victim)], check=True)
        out = ended_by_itself(job, 120, f"rank 1 was {'killed' if how == 'kill' else 'stopped'}")
    finally:
        kill_tree(job)
    code, line = ENDED[how]
    assert job.returncode == code and line in out.splitlines(), out[-3000:]
    if how == "stall":
        lines = [line for line in out.splitlines() if "hvdtrain: error:" in line]
        assert lines and ("made no progress for" in lines[0] or "a collective failed" in lines[0]), out[-3000:]
        assert "rerun the same command to resume" in lines[0]
    import tensorflow as tf
    latest = checkpoint.latest(run)
    assert tf.train.load_checkpoint(str(latest / "state")).get_variable_to_shape_map()
    assert checkpoint.read_meta(latest)["global_step"] > 0
