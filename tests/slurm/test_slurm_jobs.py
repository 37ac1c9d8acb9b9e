"""The slurm/ scripts on a real Slurm (munge, slurmctld, slurmd started by scripts/slurm-local.sh), 2 tasks.

The jobs are the repository's own slurm/*.sbatch files, submitted through `hvdtrain slurm render|submit`
(which point sbatch at them) or plain sbatch, and launched with srun --mpi=pmix.
"""
from __future__ import annotations

import json
import shutil

import pytest

from slurm_cluster import (EPOCHS, JOB, REPO, STEPS_PER_EPOCH, VENV_BIN, compare_models, job_id_from,
                           preempt_and_check_resume)

HVDTRAIN = str(VENV_BIN / "hvdtrain")
# A config directory whose name would run commands if any layer let a shell re-read it.
WEIRD_DIR = "cfg dir $(touch INJECTED) `touch INJECTED2` $HOME"



@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Job working directory, with the digits config under a hostile directory name."""
    root = tmp_path_factory.mktemp("jobs")
    (root / WEIRD_DIR).mkdir()
    shutil.copy(REPO / "configs/digits.yaml", root / WEIRD_DIR / "digits $USER.yaml")
    return root


def config_path(work):
    return str(work / WEIRD_DIR / "digits $USER.yaml")


def submit_args(work, name: str) -> list[str]:
    """Options of `hvdtrain slurm render|submit` for one 2-task job writing into work/<name>."""
    return ["--tasks-per-node", "2", "--time", "30", "--job-name", name, "--output", str(work / f"{name} $x-%j.out"),
            "--config", config_path(work), f"--trainer.run_dir={work / name} $y", *JOB]


def read_log(work, name: str, job_id: str) -> str:
    return (work / f"{name} $x-{job_id}.out").read_text()


@pytest.fixture(scope="module")
def reference(cluster, work):
    """The uninterrupted training job: `hvdtrain slurm render`, executed by bash exactly as a user would paste it."""
    rendered = cluster.run([HVDTRAIN, "slurm", "render", *submit_args(work, "reference")])
    assert rendered.returncode == 0, rendered.stderr
    submitted = cluster.run(["bash", "-c", rendered.stdout], cwd=work)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = job_id_from(submitted.stdout)
    info = cluster.wait_done(job_id, work / f"reference $x-{job_id}.out")
    return {"job": info, "id": job_id, "run": work / "reference $y", "log": read_log(work, "reference", job_id)}


def test_training_job_completes_on_two_ranks_with_identical_weights(reference, work):
    assert reference["job"]["JobState"] == "COMPLETED", reference["log"]
    assert reference["job"]["ExitCode"] == "0:0" and reference["job"]["Restarts"] == "0"
    log = reference["log"]
    assert "srun" in log and "2 tasks" in log
    assert "[hvdtrain] 2 rank(s) on 1 host(s), controller mpi" in log
    assert f"epoch {EPOCHS}/{EPOCHS}" in log and "test accuracy" in log
    run = reference["run"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["num_ranks"] == 2
    assert summary["global_step"] == EPOCHS * STEPS_PER_EPOCH
    # The agreed hash (every rank's digest was gathered and found equal) is the one of the exported model.
    assert compare_models(run / "model.keras")["digests"] == [summary["weights_sha256"]]
    # The run directory is complete, and the config the job read is the one under the hostile path.
    assert {"config.yaml", "metrics.csv", "model.keras", "summary.json", "checkpoints", "tensorboard"} <= \
        {p.name for p in run.iterdir()}
    assert (run / "checkpoints" / f"ckpt-{EPOCHS * STEPS_PER_EPOCH:08d}" / "meta.json").is_file()
    assert "hidden:\n  - 256\n  - 128" in (run / "config.yaml").read_text()
    assert not list(work.rglob("INJECTED*")) and not list(REPO.glob("INJECTED*"))


def test_preempted_job_checkpoints_requeues_and_resumes_to_the_same_model(cluster, work, reference):
    name = "preempted"
    submitted = cluster.run([HVDTRAIN, "slurm", "submit", *submit_args(work, name)], cwd=work)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = job_id_from(submitted.stdout)
    run, log_path = work / f"{name} $y", work / f"{name} $x-{job_id}.out"
    preempt_and_check_resume(cluster, job_id, log_path, run, reference["run"], ranks=2)


def test_mpirun_launcher_for_sites_without_pmix(cluster, work):
    name = "mpirun"
    args = ["--launcher", "mpirun", "--tasks-per-node", "2", "--time", "30", "--job-name", name,
            "--output", str(work / f"{name}-%j.out"), "--trainer.epochs=2", f"--trainer.run_dir={work / name}"]
    submitted = cluster.run([HVDTRAIN, "slurm", "submit", *args], cwd=work)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = job_id_from(submitted.stdout)
    info = cluster.wait_done(job_id, work / f"{name}-{job_id}.out")
    log = (work / f"{name}-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    assert "launcher mpirun" in log and "[hvdtrain] 2 rank(s) on 1 host(s), controller mpi" in log
    summary = json.loads((work / name / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["num_ranks"] == 2


@pytest.mark.parametrize("options, message", [
    (["--config", "/nonexistent/job.yaml"], "config file not found: /nonexistent/job.yaml"),
    (["--nodes", "4"], "partition debug has 1 node(s), 4 requested"),
    (["--time", "2:00:00"], "--time 2:00:00 exceeds the time limit of partition debug (01:00:00)"),
    (["--partition", "nosuch"], "partition 'nosuch' does not exist"),
    (["--gpus-per-node", "2"], "sbatch refused: Invalid generic resource (gres) specification"),
    (["--tasks-per-node", "2", "--cpus-per-task", "2"], "sbatch refused: More processors requested than permitted"),
    (["--tasks-per-node", "3"], "global_batch_size=64 is not divisible by the 3 ranks"),
])
def test_impossible_submission_is_refused_at_once_with_one_line(cluster, work, options, message):
    before = cluster.job_ids()
    proc = cluster.run([HVDTRAIN, "slurm", "submit", "--time", "30", *options], cwd=work)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("hvdtrain: error: ") and message in errors[0], proc.stderr
    assert cluster.job_ids() == before   # nothing was queued, so nothing can pend forever


def test_predict_template_scores_the_test_split_on_two_ranks(cluster, work, reference):
    out = work / "preds dir $z" / "preds.csv"
    out.parent.mkdir()
    job_id = submit_plain(cluster, work, "predict.sbatch", ["--run", str(reference["run"]), "--output", str(out)])
    info = cluster.wait_done(job_id, work / f"predict-{job_id}.out")
    log = (work / f"predict-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    assert "2 rank(s)" in log
    rows = out.read_text().splitlines()
    assert rows[0].startswith("index,class") and len(rows) == 1 + 360   # every held-out example, once, in order
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(360))


def test_bench_template_measures_allreduce_on_two_ranks(cluster, work):
    out = work / "bench" / "allreduce.json"
    job_id = submit_plain(cluster, work, "bench.sbatch", ["--output", str(out), "--min-size", "4KB",
                                                          "--max-size", "64KB", "--budget-mb", "1", "--repeats", "1"],
                          nodes=1)
    info = cluster.wait_done(job_id, work / f"bench-{job_id}.out")
    log = (work / f"bench-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    doc = json.loads(out.read_text())
    assert doc["np"] == 2 and doc["rows"] and all(row["correct"] for row in doc["rows"]), doc
    impls = {row["impl"] for row in doc["rows"]}   # raw MPI_Allreduce next to hvdtrain's Horovod path, same ranks
    assert any(i.startswith("mpi4py") for i in impls) and any(i.startswith("hvdtrain") for i in impls), impls


def submit_plain(cluster, work, script: str, args: list[str], nodes: int = 1) -> str:
    """sbatch slurm/<script> from the repository root, as docs/slurm.md shows (no hvdtrain slurm)."""
    kind = script.split(".")[0]
    proc = cluster.run(["sbatch", f"--nodes={nodes}", "--ntasks-per-node=2", f"--output={work}/{kind}-%j.out",
                        f"slurm/{script}", *args], cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return job_id_from(proc.stdout)


# ---------------------------------------------------------------- your own Keras script (slurm/run.sbatch)

@pytest.fixture(scope="module")
def example_data(work):
    from conftest import example_digits
    return example_digits(work / "example-data")


def submit_example(cluster, work, name: str, data) -> tuple[str, object]:
    """sbatch slurm/run.sbatch python examples/keras_resumable.py ..., 2 tasks, as docs/slurm.md shows. 12 epochs of
    ~0.2 s: a USR1 sent after the first checkpoint lands mid-training with seconds to spare."""
    run = work / name
    proc = cluster.run(["sbatch", "--ntasks-per-node=2", "--time=30", f"--job-name={name}",
                        f"--output={work}/{name}-%j.out", "slurm/run.sbatch", str(VENV_BIN / "python"),
                        "examples/keras_resumable.py", "--run-dir", str(run), "--data", str(data), "--epochs", "12",
                        "--deterministic"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return job_id_from(proc.stdout), run


def test_own_keras_script_survives_preemption_on_slurm_bit_exactly(cluster, work, example_data):
    ref_id, ref_run = submit_example(cluster, work, "example-reference", example_data)
    job_id, run = submit_example(cluster, work, "example-preempted", example_data)
    log_path = work / f"example-preempted-{job_id}.out"
    cluster.wait_while_running(job_id, "the first checkpoint", lambda: any(run.glob("checkpoints/ckpt-*")), log_path)
    signalled = cluster.run(["scancel", "--signal=USR1", "--batch", job_id])
    assert signalled.returncode == 0, signalled.stderr
    info = cluster.wait_done(job_id, log_path)
    log = log_path.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log   # stopped, requeued once, finished
    assert "[slurm] USR1" in log and "on request (SIGUSR1)" in log and f"requeueing job {job_id}" in log
    assert "resuming from" in log.split(f"[slurm] job {job_id} run 2", 1)[1]
    ref_info = cluster.wait_done(ref_id, work / f"example-reference-{ref_id}.out")
    assert ref_info["JobState"] == "COMPLETED"
    final, reference = (json.loads((r / "summary.json").read_text()) for r in (run, ref_run))
    assert final["status"] == reference["status"] == "completed" and final["num_ranks"] == 2
    assert final["weights_sha256"] == reference["weights_sha256"]            # bit for bit, across the requeue
