"""Real Slurm clusters for the tests (scripts/slurm-local.sh, scripts/virtual-cluster) and helpers to drive them."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
LOCAL = REPO / "scripts" / "slurm-local.sh"
VIRTUAL = REPO / "scripts" / "virtual-cluster"
# Hang guard only: a job that is not done by then is stuck; no test asserts on how long anything takes.
JOB_DEADLINE_S = 600
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")

# The job of the preemption tests, uninterrupted and preempted alike (deterministic ops make the two comparable).
EPOCHS, STEPS_PER_EPOCH, CHECK_EVERY = 6, 1437 // 64, 10
JOB = [f"--trainer.epochs={EPOCHS}", "--runtime.deterministic=true", "--trainer.keep_checkpoints=100",
       f"--trainer.check_every_steps={CHECK_EVERY}", "--trainer.progress=epoch"]

# Weight digests of saved models (the algorithm of hvdtrain.backend.weights_digest) and their largest difference.
COMPARE = """
import hashlib, json, sys
import numpy as np, tensorflow as tf
models = [tf.keras.models.load_model(p, compile=False).get_weights() for p in sys.argv[1:]]
def digest(ws):
    h = hashlib.sha256()
    for w in ws:
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()
print(json.dumps({"digests": [digest(m) for m in models],
                  "max_abs_diff": [max(float(np.abs(a - b).max()) for a, b in zip(models[0], m)) for m in models[1:]]}))
"""


def _free_port_pair() -> int:
    """A port p such that p and p+1 (slurmctld, slurmd) are both free right now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        with socket.socket() as s2:
            try:
                s2.bind(("", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free pair of ports for slurmctld and slurmd")


class Cluster:
    """A cluster started by `script up` with its state in state_dir (settings: the script's VC_* variables)."""

    def __init__(self, state_dir: Path, script: Path = LOCAL, **settings: str):
        self.dir, self.script = state_dir, script
        port = str(_free_port_pair())
        self.env = dict(os.environ, SLURM_CONF=str(state_dir / "slurm.conf"), SLURM_LOCAL_PORT=port, VC_PORT=port,
                        VC_DIR=str(state_dir), PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}", PYTHONUNBUFFERED="1",
                        **settings)

    def local(self, action: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.script), action, str(self.dir)], env=self.env, capture_output=True, text=True,
                              timeout=120)

    def run(self, argv, cwd=None, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        """Run a command against this cluster (SLURM_CONF set, the virtualenv first on PATH); env adds variables."""
        return subprocess.run(argv, env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True,
                              timeout=120, **kw)

    def job(self, job_id: str) -> dict:
        """scontrol's view of a job as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run(["scontrol", "show", "job", "--oneliner", job_id]).stdout
        return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)

    def diagnosis(self, job_id: str) -> str:
        """What Slurm says of a job: scontrol's record and its daemons' log lines naming the job (for failures)."""
        lines = [self.run(["scontrol", "show", "job", job_id]).stdout]
        for log in sorted((self.dir / "log").glob("*.log")):
            lines += [f"{log.name}: {line}" for line in log.read_text(errors="replace").splitlines() if job_id in line]
        return "\n".join(lines[-60:])

    def job_ids(self) -> list[str]:
        out = self.run(["scontrol", "show", "jobs", "--oneliner"]).stdout
        return [line.split()[0].split("=", 1)[1] for line in out.splitlines() if line.startswith("JobId=")]

    def wait_for(self, what: str, ready, log: Path | None = None, poll_s: float = 0.5):
        """Poll `ready()` until it returns something truthy (hang guard: JOB_DEADLINE_S)."""
        deadline = time.monotonic() + JOB_DEADLINE_S
        while time.monotonic() < deadline:
            value = ready()
            if value:
                return value
            time.sleep(poll_s)
        text = log.read_text() if log and log.exists() else "(no log)"
        raise AssertionError(f"gave up waiting for {what}\n{text}")

    def wait_done(self, job_id: str, log: Path | None = None) -> dict:
        return self.wait_for(f"job {job_id} to end", lambda: (lambda j: j if j.get("JobState") in FINAL else None)(
            self.job(job_id)), log)

    def wait_while_running(self, job_id: str, what: str, ready, log: Path):
        """Like wait_for, but a job that ends first fails the wait at once."""
        def check():
            if ready():
                return True
            state = self.job(job_id).get("JobState")
            assert state not in FINAL, f"job {job_id} ended ({state}) before {what}\n{log.read_text() if log.exists() else ''}"
            return False
        return self.wait_for(what, check, log, poll_s=0.1)


def compare_models(*paths) -> dict:
    proc = subprocess.run([str(VENV_BIN / "python"), "-c", COMPARE, *map(str, paths)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def job_id_from(text: str) -> str:
    """The job id in sbatch's or `hvdtrain slurm submit`'s output."""
    found = re.search(r"(?:Submitted batch job|submitted job) (\d+)", text)
    assert found, text
    return found.group(1)


def preempt_and_check_resume(cluster: Cluster, job_id: str, log_path: Path, run: Path, reference_run: Path,
                             ranks: int, release_requeued: bool = False) -> str:
    """Preempt a running training job of the JOB config as Slurm would, and check the whole cycle: one agreed stop
    step, a checkpoint there, a requeue by the batch script, a second run resuming from that checkpoint, and a final
    model equal to the uninterrupted one in reference_run. release_requeued: once requeued, the job may start at once
    (scontrol update StartTime=now, as an admin may) instead of after the cluster's requeue delay (cred_expire).
    Returns the job log."""
    # Signal as Slurm's --signal=B:USR1@... would, once rank 0 has logged its start: that line comes after collectives
    # all ranks must join, so every rank has its stop handler installed, and the stop request stays latched until the
    # next agreement step. The run is thus always mid-training when it stops, whatever the machine's speed.
    cluster.wait_while_running(job_id, "training to start",
                               lambda: log_path.exists() and f"[hvdtrain] {ranks} rank(s)" in log_path.read_text(),
                               log_path)
    signalled = cluster.run(["scancel", "--signal=USR1", "--batch", job_id])
    assert signalled.returncode == 0, signalled.stderr
    if release_requeued:
        def requeued():
            job = cluster.job(job_id)
            return job.get("Restarts") == "1" and job.get("JobState") == "PENDING"
        cluster.wait_while_running(job_id, "the batch script to requeue the job", requeued, log_path)
        # Slurm revokes the old run's credential at the requeue and refuses a launch whose credential was made in the
        # same second (cred ctime <= revoke time): start no earlier than the next whole second.
        time.sleep(2)
        released = cluster.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
        assert released.returncode == 0, released.stdout + released.stderr
    info = cluster.wait_done(job_id, log_path)
    log = log_path.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log + cluster.diagnosis(job_id)
    assert info["Restarts"] == "1", log + cluster.diagnosis(job_id)   # requeued exactly once, by the batch script

    # First run: all ranks stopped at one agreed step and rank 0 wrote a checkpoint there.
    stopped = re.findall(r"stopped at epoch (\d+), step (\d+) on request \(SIGUSR1\)", log)
    assert len(stopped) == 1, log
    epoch, step = int(stopped[0][0]), int(stopped[0][1])
    global_step = (epoch - 1) * STEPS_PER_EPOCH + step
    assert 0 < global_step < EPOCHS * STEPS_PER_EPOCH
    assert step % CHECK_EVERY == 0 or step == STEPS_PER_EPOCH   # agreement happens every CHECK_EVERY steps
    meta = json.loads((run / "checkpoints" / f"ckpt-{global_step:08d}" / "meta.json").read_text())
    assert (meta["epoch"] * STEPS_PER_EPOCH + meta["step_in_epoch"], meta["global_step"]) == (global_step, global_step)
    assert "[slurm] job step ended with exit code 0" in log and f"requeueing job {job_id}" in log

    # Requeued run: resumed from that checkpoint (not from zero), finished, same model as without interruption.
    second = log.split(f"[slurm] job {job_id} run 2", 1)
    assert len(second) == 2, log
    assert f"resuming from {run}/checkpoints/ckpt-{global_step:08d}" in second[1]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert summary["num_ranks"] == ranks
    compared = compare_models(reference_run / "model.keras", run / "model.keras")
    assert compared["max_abs_diff"][0] <= 1e-5, compared
    return log
