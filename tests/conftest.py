"""Shared helpers: launch real multi-process runs with horovodrun from the project's virtualenv."""
from __future__ import annotations

import importlib.metadata
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


TIERS = ("unit", "parallel", "integration", "slurm")


def pytest_collection_modifyitems(config, items):
    """One marker per tier, from the test's directory (tests/<tier>/...; tests/bench counts as unit), and the tiers
    in order: unit tests first, so a broken basic fails within seconds, not after the slow tiers."""
    def tier(item) -> str:
        part = Path(str(item.fspath)).relative_to(REPO / "tests").parts[0]
        return part if part in TIERS else "unit"
    for item in items:
        item.add_marker(getattr(pytest.mark, tier(item)))
    if KERAS_MAJOR < 3:   # tests of hvdtrain's own Keras 3 layer do not apply: Keras 2 trains with Horovod's
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("keras3")])
        items[:] = [item for item in items if not item.get_closest_marker("keras3")]
    items.sort(key=lambda item: TIERS.index(tier(item)))


def env() -> dict:
    out = dict(os.environ)
    out.update(PATH=f"{BIN}:{out.get('PATH', '')}", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    # Horovod's background thread wakes every cycle: at hvdtrain's 0.05 ms (chosen for step latency) an idle Gloo rank
    # burns ~70% of a core, at 1 ms ~15% (measured). The suite runs several launches side by side on 2 cores, where
    # that CPU is taken from the other ranks; no test is about latency. (An outer setting wins, as for users.)
    out.setdefault("HOROVOD_CYCLE_TIME", "1")
    return out


def horovodrun(np: int, args: list[str], launcher: str = "gloo", timeout: float = 300, cwd=REPO) -> subprocess.CompletedProcess:
    """Run `horovodrun -np N <launcher flags> args...`; returns the completed process (stdout+stderr text)."""
    cmd = [str(BIN / "horovodrun"), "-np", str(np), *LAUNCHERS[launcher], *args]
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


COMMANDS_WORKER = REPO / "tests/parallel/workers/commands_worker.py"


def run_commands(np: int, jobs: list[dict], out: Path, launcher: str = "gloo", timeout: float = 900,
                 cwd=REPO, prefix: tuple = (), worker=COMMANDS_WORKER) -> list[dict]:
    """Many `hvdtrain` commands in ONE launch of `np` ranks (tests/parallel/workers/commands_worker.py, or a worker
    built on it; np=1: one process, no launcher): start-up paid once. jobs: [{"name", "argv", optional "cwd"}];
    prefix: what the rank command starts with (e.g. env VAR=...). Returns, per rank, {name: {"code", "stdout",
    "stderr"}}."""
    import json
    spec = out / "jobs.json"
    spec.write_text(json.dumps(jobs))
    command = [*prefix, "python" if np > 1 else sys.executable, str(worker), str(spec), str(out)]
    proc = horovodrun(np, command, launcher, timeout=timeout, cwd=cwd) if np > 1 else \
        subprocess.run(command, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, output(proc)[-5000:]
    return [json.loads((out / f"results-rank{r}.json").read_text()) for r in range(np)]


def printed(ranks: list[dict], name: str) -> str:
    """Everything every rank printed during one command of run_commands."""
    return "".join(r[name]["stdout"] + r[name]["stderr"] for r in ranks)


def hvdtrain(args: list[str], timeout: float = 300, cwd=REPO) -> subprocess.CompletedProcess:
    """Run the `hvdtrain` console script in one process, as a user would without a launcher."""
    return subprocess.run([str(BIN / "hvdtrain"), *args], cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


@pytest.fixture
def small_digits(tmp_path):
    """Overrides for a short digits run in a fresh run directory."""
    return ["--config", str(REPO / "configs/digits.yaml"), f"--trainer.run_dir={tmp_path / 'run'}", "--trainer.epochs=3"]


def example_digits(folder):
    """examples/keras_resumable.py's data: digits in 3 TFRecord files of 700, 300 and 437 examples (with 2 ranks,
    rank 1's shard is the short one) and the held-out 360 in test.npz."""
    import numpy as np
    from sklearn.datasets import load_digits
    from hvdtrain.data import write_tfrecords
    folder.mkdir(parents=True, exist_ok=True)
    d = load_digits()
    x, y = (d.images / 16.0).reshape(-1, 64).astype(np.float32), d.target.astype(np.int64)
    for i, (a, b) in enumerate(((0, 700), (700, 1000), (1000, 1437))):
        write_tfrecords(x[a:b], y[a:b], [str(folder / f"part-{i}.tfrecord")])
    np.savez(folder / "test.npz", x=x[1437:], y=y[1437:])
    return folder


def start_horovodrun(np: int, args: list[str], launcher: str = "gloo", cwd=REPO) -> subprocess.Popen:
    """horovodrun in the background (its own session, so a test can clean up the whole tree by pid)."""
    cmd = [str(BIN / "horovodrun"), "-np", str(np), *LAUNCHERS[launcher], *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def start_launch(np: int, args: list[str], controller: str = "mpi", cwd=REPO) -> subprocess.Popen:
    """scripts/launch.sh (as `make train` runs it) in the background, as start_horovodrun."""
    return subprocess.Popen([str(REPO / "scripts/launch.sh"), str(np), *args], cwd=cwd,
                            env={**env(), "HVDTRAIN_CONTROLLER": controller}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def ended_by_itself(job: subprocess.Popen, timeout: float, since: str) -> str:
    """The output of a background job that must end on its own within `timeout` seconds of `since` (a hang guard:
    the test fails saying so, and the caller's kill_tree cleans up)."""
    try:
        return job.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the job was still running {timeout:g} s after {since}") from None


def rank_pids(proc: subprocess.Popen, size: int, timeout: float = 60) -> dict[int, int]:
    """{rank: pid} of the training processes under a launcher, read from each process's environment."""
    import time

    import psutil
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                environ, cmdline = child.environ(), " ".join(child.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rank = environ.get("HOROVOD_RANK", environ.get("OMPI_COMM_WORLD_RANK"))
            if rank is not None and "python" in cmdline and "horovodrun" not in cmdline and "orted" not in cmdline:
                found[int(rank)] = child.pid
        if len(found) == size:
            return found
        time.sleep(0.2)
    raise AssertionError(f"did not find {size} rank processes under pid {proc.pid}")


def kill_tree(proc: subprocess.Popen) -> None:
    """Stop a background launcher and everything it started, by process id."""
    import psutil
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


def wait_for(predicate, timeout: float = 120, what: str = "condition"):
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The Keras this virtualenv holds (3 on the TF 2.21 stack, 2 on TF 2.15), read without importing TensorFlow.
KERAS_VERSION = importlib.metadata.version("keras")
KERAS_MAJOR = int(KERAS_VERSION.split(".")[0])


def assert_rank_stack(stack: dict) -> None:
    """The stack as a rank saw it: this virtualenv's TensorFlow and Keras, and the Keras layer hvdtrain picked."""
    tf_version = importlib.metadata.version("tensorflow-cpu")
    assert (stack["source"], stack["tensorflow"], stack["keras"]) == ("rank", tf_version, KERAS_VERSION)
    assert stack["name"] == ("tf2.21" if KERAS_MAJOR >= 3 else "tf2.15")
    from hvdtrain.runtime import KERAS_LAYERS
    assert stack["integration"] == KERAS_LAYERS[stack["name"]]


def agreed_sources(cfg, size: int, split: str = "train") -> list:
    """One data source per rank of a `size`-rank world, each adopting what every rank's validation found (what the
    trainer does under its agreement, backend.gather_agreed), in one process."""
    from hvdtrain import data
    from hvdtrain.world import World
    sources = [data.open_source(cfg) for _ in range(size)]
    parts = [s.validate(World(rank=r, size=size), split) for r, s in enumerate(sources)]
    for s in sources:
        s.adopt(split, parts)
    return sources


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """The single-node Slurm cluster (scripts/slurm-local.sh) the tests in tests/slurm share: started once, stopped
    by pid. (Here and not in tests/slurm/conftest.py: a second conftest module would shadow this one's helpers.)"""
    sys.path.insert(0, str(REPO / "tests" / "slurm"))
    from slurm_cluster import Cluster
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    up = c.local("up")
    assert up.returncode == 0, up.stdout + up.stderr
    yield c
    down = c.local("down")
    assert down.returncode == 0, down.stdout + down.stderr
