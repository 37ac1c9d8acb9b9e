"""Two Slurm nodes on one machine (scripts/virtual-cluster): each slurmd in its own network, UTS and mount
namespaces, so a 2-node job runs its ranks on two hosts and Horovod's ring crosses TCP between them."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from slurm_cluster import VENV_BIN, VIRTUAL, Cluster, compare_models

HVDTRAIN = str(VENV_BIN / "hvdtrain")


@pytest.fixture(scope="module")
def vcluster():
    # Outside /tmp: every node has a private /tmp, the rest of the file system is shared like a cluster's.
    state = Path(tempfile.mkdtemp(prefix="hvdtrain-vc-test-", dir="/var/tmp"))
    # Own names, subnet and ports, so a user's `scripts/virtual-cluster up` (hv*, 10.77.0) is left alone.
    c = Cluster(state, VIRTUAL, VC_NAME="hvt", VC_NET="10.78.0", VC_NODES="2")
    up = c.local("up")
    assert up.returncode == 0, up.stdout + up.stderr
    yield c
    down = c.local("down")
    assert down.returncode == 0, down.stdout + down.stderr
    shutil.rmtree(state, ignore_errors=True)


def test_two_node_job_has_one_rank_per_host_and_identical_weights(vcluster):
    work = vcluster.dir / "shared"
    run = work / "run"
    proc = vcluster.run([HVDTRAIN, "slurm", "submit", "--nodes", "2", "--tasks-per-node", "1", "--time", "30",
                         "--output", f"{work}/two-nodes-%j.out", "--trainer.epochs=3", f"--trainer.run_dir={run}"],
                        cwd=work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = proc.stdout.split()[2].rstrip(":")
    log_path = work / f"two-nodes-{job_id}.out"
    info = vcluster.wait_done(job_id, log_path)
    log = log_path.read_text()
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "hvtnode[1-2]", log
    assert f"[slurm] job {job_id} run 1 on hvtnode[1-2]: 2 tasks (1 per node), launcher srun" in log
    assert "[hvdtrain] 2 rank(s) on 2 host(s), controller mpi" in log
    summary = json.loads((run / "summary.json").read_text())
    # num_hosts is Horovod's cross_size: the two ranks really sit on different hosts.
    assert (summary["status"], summary["num_ranks"], summary["num_hosts"]) == ("completed", 2, 2)
    assert compare_models(run / "model.keras")["digests"] == [summary["weights_sha256"]]
    assert {"config.yaml", "metrics.csv", "model.keras", "checkpoints", "tensorboard"} <= {p.name for p in run.iterdir()}
