"""Under horovodrun -np 2 (MPI and Gloo): what scripts/patches changes in Horovod's core, checked on the real thing."""
import json

import numpy as np
import pytest

from conftest import REPO, horovodrun, output

pytestmark = pytest.mark.stacks    # both stacks build Horovod with these patches

WORKER = str(REPO / "tests/parallel/workers/wake_worker.py")


@pytest.mark.parametrize("launcher", ["mpi", "gloo"])
def test_requests_wake_horovod_and_averages_are_exact(tmp_path, launcher):
    proc = horovodrun(2, ["python", WORKER, str(tmp_path)], launcher, timeout=600)
    assert proc.returncode == 0, output(proc)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    arrays = [np.load(tmp_path / f"arrays-rank{r}.npz") for r in range(2)]
    # HOROVOD_WAKE_ON_ENQUEUE: 20 dependent all-reduces ran inside one 60 s cycle (each would otherwise wait for
    # the next one), with the right sums: rank r starts from x * (r + 1), each step halves the sum over ranks.
    for r in ranks:
        assert r["back_to_back_s"] < r["cycle_s"], r
    x = np.arange(1024, dtype=np.float32)
    held = [x, x * np.float32(2)]
    for _ in range(20):
        held = [(held[0] + held[1]) / np.float32(2)] * 2
    for a in arrays:
        assert np.array_equal(a["chained"], held[0])
    # A rank asking 0.3 s late is matched when it asks: the sums of rank + i over both ranks, on both.
    assert ranks[0]["late"] == ranks[1]["late"] == [[1.0], [3.0], [5.0]]
    # Averages scaled while copied out of the fusion buffer (a group) and in place (one tensor): (a + b) * 0.5 in
    # float32, bit for bit, on both ranks.
    n = ranks[0]["groups"]
    for i in range(n):
        own = [a[f"arr_{i}"] for a in arrays]
        reference = (own[0] + own[1]) * np.float32(0.5)
        for a in arrays:
            assert a[f"arr_{n + i}"].dtype == np.float32 and np.array_equal(a[f"arr_{n + i}"], reference)
    for a in arrays:
        assert np.array_equal(a["single"], (arrays[0]["arr_1"] + arrays[1]["arr_1"]) * np.float32(0.5))
