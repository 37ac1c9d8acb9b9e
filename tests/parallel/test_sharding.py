"""Under horovodrun (3 ranks, oversubscribed): each rank reads only its share of every global batch, with real
topology and agreement. Both data sets are read in one launch (tests/parallel/workers/data_worker.py)."""
import json

import numpy as np
import pytest

from conftest import REPO, horovodrun, output
from hvdtrain import data

WORKER = str(REPO / "tests/parallel/workers/data_worker.py")
RANKS = 3
IN_MEMORY, RECORDS = 203, 47   # examples


@pytest.fixture(scope="module")
def seen(tmp_path_factory):
    """{case: [what rank r read, for r in 0..2]}"""
    root = tmp_path_factory.mktemp("sharding")
    np.savez(root / "ids.npz", x=np.arange(IN_MEMORY, dtype=np.float32)[:, None], y=np.zeros(IN_MEMORY))
    files = [str(root / f"part-{i}.tfrecord") for i in range(2)]
    data.write_tfrecords(np.arange(RECORDS, dtype=np.float32)[:, None], np.zeros(RECORDS, np.int64), files)
    cases = {"in-memory": {"global_batch": 21, "overrides": ["--data.source=npz", f"--data.path={root / 'ids.npz'}"]},
             "tfrecords": {"global_batch": 6, "overrides": ["--data.source=tfrecord", f"--data.path={root}",
                                                            "--data.input_shape=[1]"]}}
    (root / "cases.json").write_text(json.dumps(cases))
    proc = horovodrun(RANKS, ["python", WORKER, str(root / "cases.json"), str(root)], "gloo")
    assert proc.returncode == 0, output(proc)
    return {name: [json.loads((root / f"{name}-rank{r}.json").read_text()) for r in range(RANKS)] for name in cases}


def test_in_memory_shards_make_up_each_global_batch(seen):
    ranks = seen["in-memory"]
    steps = IN_MEMORY // 21
    assert {r["steps"] for r in ranks} == {steps}
    for step in range(steps):
        held = [set(r["batches"][step]) for r in ranks]
        assert [len(r["batches"][step]) for r in ranks] == [7] * RANKS
        assert len(set().union(*held)) == 21, "two ranks read the same example in one global batch"
    everything = [i for r in ranks for batch in r["batches"] for i in batch]
    assert len(everything) == len(set(everything)) == steps * 21


def test_tfrecords_fewer_files_than_ranks_fall_back_to_elements(seen):
    ranks = seen["tfrecords"]
    steps = {r["steps"] for r in ranks}
    assert len(steps) == 1, "ranks must agree on one step count"
    assert steps == {min(len(range(r, RECORDS, RANKS)) for r in range(RANKS)) // 2}
    assert all(len(r["batches"]) == r["steps"] for r in ranks)
    seen_ids = [i for r in ranks for batch in r["batches"] for i in batch]
    assert len(seen_ids) == len(set(seen_ids)), "a record was read by two ranks"
