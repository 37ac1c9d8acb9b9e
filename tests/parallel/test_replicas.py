"""Under horovodrun -np 2 (Gloo, MPI, and two hosts on one machine): replicas stay identical."""
import json

import numpy as np
import pytest

from conftest import REPO, horovodrun, output

pytestmark = pytest.mark.stacks    # also on the TF 2.15 stack: see docs/testing.md

WORKER = str(REPO / "tests/parallel/workers/train_worker.py")


def read_ranks(out, size):
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(size)]
    weights = [np.load(out / f"weights-rank{r}.npz") for r in range(size)]
    return ranks, [[w[k] for k in sorted(w.files, key=lambda k: int(k.split("_")[1]))] for w in weights]


# Every way to average (runtime.bucket_mb and fp16 compression; buckets are Keras 3's, Keras 2 sends one request per
# tensor whatever the setting): one group in float16, one request per tensor, and 64 KB buckets across two "hosts".
AVERAGING = {"gloo": ["--runtime.bucket_mb=0", "--optim.fp16_compression=true"],
             "mpi": ["--runtime.bucket_mb=0.000001"],
             "gloo-2hosts": ["--runtime.bucket_mb=0.0625"]}


@pytest.mark.parametrize("launcher", list(AVERAGING))
def test_training_keeps_replicas_bit_identical(tmp_path, launcher):
    proc = horovodrun(2, ["python", WORKER, str(tmp_path), "--config", "configs/digits.yaml",
                          f"--trainer.run_dir={tmp_path / 'run'}", "--trainer.epochs=2", *AVERAGING[launcher]], launcher)
    assert proc.returncode == 0, output(proc)
    ranks, weights = read_ranks(tmp_path, 2)
    assert [r["topology"]["rank"] for r in ranks] == [0, 1]
    assert all(r["topology"]["size"] == 2 for r in ranks)
    if launcher == "gloo-2hosts":  # one rank per "host": the cross-host code path
        assert [r["topology"]["cross_size"] for r in ranks] == [2, 2]
        assert [r["topology"]["local_size"] for r in ranks] == [1, 1]
        assert sorted(r["topology"]["cross_rank"] for r in ranks) == [0, 1]
    else:
        assert [r["topology"]["local_rank"] for r in ranks] == [0, 1]
    assert ranks[0]["topology"]["controller"] == ("mpi" if launcher == "mpi" else "gloo")
    for a, b in zip(*weights):
        assert a.dtype == b.dtype and np.array_equal(a, b), "replicas diverged"
    assert any(not np.array_equal(w, np.zeros_like(w)) for w in weights[0])
    # Averaged metrics are the same numbers on every rank (throughput is timed per rank, so it may differ).
    metric_keys = ("loss", "accuracy", "val_loss", "val_accuracy")
    per_rank = [[{k: h[k] for k in metric_keys} for h in r["history"]] for r in ranks]
    assert per_rank[0] == per_rank[1] and len(per_rank[0]) == 2
    assert ranks[0]["summary"]["weights_sha256"] == ranks[1]["summary"]["weights_sha256"]
