"""Shared helpers: launch real multi-process runs with horovodrun from the project's virtualenv."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# The three ways the parallel tier launches: Gloo, MPI, and two "hosts" on one machine (the multi-host code path).
LAUNCHERS = {
    "gloo": ["--gloo"],
    "mpi": ["--mpi"],
    "gloo-2hosts": ["--gloo", "-H", "localhost:1,127.0.0.1:1"],
}


def env() -> dict:
    out = dict(os.environ)
    out.update(PATH=f"{BIN}:{out.get('PATH', '')}", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return out


def horovodrun(np: int, args: list[str], launcher: str = "gloo", timeout: float = 300, cwd=REPO) -> subprocess.CompletedProcess:
    """Run `horovodrun -np N <launcher flags> args...`; returns the completed process (stdout+stderr text)."""
    cmd = [str(BIN / "horovodrun"), "-np", str(np), *LAUNCHERS[launcher], *args]
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def hvdtrain(args: list[str], timeout: float = 300, cwd=REPO) -> subprocess.CompletedProcess:
    """Run the `hvdtrain` console script in one process, as a user would without a launcher."""
    return subprocess.run([str(BIN / "hvdtrain"), *args], cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


@pytest.fixture
def small_digits(tmp_path):
    """Overrides for a short digits run in a fresh run directory."""
    return ["--config", str(REPO / "configs/digits.yaml"), f"--trainer.run_dir={tmp_path / 'run'}", "--trainer.epochs=3"]
