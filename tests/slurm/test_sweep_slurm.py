"""`hvdtrain sweep --slurm` on a real Slurm (scripts/slurm-local.sh): every trial is a job of slurm/train.sbatch on 2
tasks; the driver can be killed and rerun while the jobs go on, and a preempted trial requeues itself and resumes from
its own checkpoint while the driver follows its job id."""
from __future__ import annotations

import csv
import json
import re
import subprocess

from slurm_cluster import JOB_DEADLINE_S, REPO, VENV_BIN

HVDTRAIN = str(VENV_BIN / "hvdtrain")
EPOCHS = 12   # enough that the USR1 sent once trial 0 trains always lands mid-training (epochs take ~0.2 s)


def job_log(out, number: int):
    logs = sorted((out / "trials" / f"{number:04d}").glob("slurm-*.out"))
    return logs[-1] if logs else None


def test_sweep_runs_trials_as_jobs_and_survives_its_driver_and_a_preemption(cluster, tmp_path):
    space, out = tmp_path / "space.yaml", tmp_path / "lr"
    space.write_text("optim.lr: {log_uniform: [0.01, 0.3]}\noptim.warmup_epochs: {uniform: [0, 1]}\n")
    args = [HVDTRAIN, "sweep", "--config", str(REPO / "configs/digits.yaml"), "--space", str(space), "--trials", "2",
            "--output", str(out), "--slurm", "--tasks-per-node", "2", "--time", "30", "--parallel", "2",
            f"--trainer.epochs={EPOCHS}", "--runtime.deterministic=true", "--trainer.tensorboard=false",
            "--trainer.progress=epoch", "--trainer.check_every_steps=10"]

    # Driver 1 submits both trials (the node has room for one 2-task job at a time: the other waits in the queue).
    with open(tmp_path / "driver1.log", "w") as log:
        first = subprocess.Popen(args, cwd=tmp_path, env=cluster.env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    started = lambda: (job_log(out, 0) and "[hvdtrain] 2 rank(s)" in job_log(out, 0).read_text()
                       and (out / "trials/0001").is_dir()) or first.poll() is not None
    cluster.wait_for("trial 0 to train and trial 1 to be submitted", started, tmp_path / "driver1.log")
    assert first.poll() is None, (tmp_path / "driver1.log").read_text()
    job0 = re.search(r"slurm-(\d+)\.out", job_log(out, 0).name).group(1)
    first.kill()            # the driver dies; the jobs go on
    first.wait(timeout=60)
    # ... and trial 0 is preempted as Slurm's time-limit notice would: agreed stop, checkpoint, requeue.
    signalled = cluster.run(["scancel", "--signal=USR1", "--batch", job0])
    assert signalled.returncode == 0, signalled.stderr

    second = subprocess.run(args, cwd=tmp_path, env=cluster.env, capture_output=True, text=True,
                            timeout=2 * JOB_DEADLINE_S)
    assert second.returncode == 0, second.stdout + second.stderr + (tmp_path / "driver1.log").read_text()
    assert f"trial 0 is still running (job {job0}): following it" in second.stdout, second.stdout
    assert " started " not in second.stdout and "relaunched" not in second.stdout   # nothing submitted twice

    table = list(csv.DictReader((out / "trials.csv").open()))
    assert [(r["trial"], r["status"]) for r in table] == [("0", "completed"), ("1", "completed")], table
    job1 = re.search(r"slurm-(\d+)\.out", job_log(out, 1).name).group(1)
    assert job1 != job0
    for number, job_id in ((0, job0), (1, job1)):
        info = cluster.job(job_id)
        assert info["JobName"] == f"sweep-lr-t{number:04d}" and info["JobState"] == "COMPLETED", info
        summary = json.loads((out / "trials" / f"{number:04d}" / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["num_ranks"] == 2
        assert summary["global_step"] == EPOCHS * (1437 // 64)
        assert float(table[number]["test_accuracy"]) == summary["test_accuracy"]
        log = job_log(out, number).read_text()
        assert f"[slurm] job {job_id} run 1" in log and "srun" in log and "2 tasks" in log
    # The preempted trial: requeued once by its batch script, resumed from its own checkpoint in its run directory.
    assert cluster.job(job0)["Restarts"] == "1"
    log0 = job_log(out, 0).read_text()
    assert "on request (SIGUSR1)" in log0 and f"requeueing job {job0}" in log0
    assert f"[slurm] job {job0} run 2" in log0 and f"resuming from {out}/trials/0000/checkpoints/ckpt-" in log0
    assert cluster.job(job1)["Restarts"] == "0"
    assert (out / "best.yaml").is_file() and (out / "sweep.png").is_file()
