"""Real Slurm clusters for the tests (scripts/slurm-local.sh, scripts/virtual-cluster) and helpers to drive them."""
from __future__ import annotations

import json
import os
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

# Weight digests of saved models (the algorithm of hvdtrain.dist.weights_digest) and their largest difference.
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

    def run(self, argv, cwd=None, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env, cwd=cwd, capture_output=True, text=True, timeout=120, **kw)

    def job(self, job_id: str) -> dict:
        """scontrol's view of a job as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run(["scontrol", "show", "job", "--oneliner", job_id]).stdout
        return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)

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
