"""Under horovodrun: each rank reads only its share of every global batch, with real topology and agreement."""
import json

import numpy as np
import pytest

from conftest import REPO, horovodrun, output
from hvdtrain import data

WORKER = str(REPO / "tests/parallel/workers/data_worker.py")


def run(tmp_path, np_, global_batch, overrides):
    proc = horovodrun(np_, ["python", WORKER, str(tmp_path), str(global_batch), *overrides], "gloo")
    assert proc.returncode == 0, output(proc)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(np_)]


def test_in_memory_shards_make_up_each_global_batch(tmp_path):
    n = 203
    np.savez(tmp_path / "ids.npz", x=np.arange(n, dtype=np.float32)[:, None], y=np.zeros(n))
    ranks = run(tmp_path, 2, 20, ["--data.source=npz", f"--data.path={tmp_path / 'ids.npz'}"])
    assert {r["steps"] for r in ranks} == {n // 20}
    for step in range(n // 20):
        a, b = ranks[0]["batches"][step], ranks[1]["batches"][step]
        assert len(a) == len(b) == 10 and not set(a) & set(b)
    everything = [i for r in ranks for batch in r["batches"] for i in batch]
    assert len(everything) == len(set(everything)) == (n // 20) * 20


def test_tfrecords_fewer_files_than_ranks_fall_back_to_elements(tmp_path):
    n = 47
    files = [str(tmp_path / f"part-{i}.tfrecord") for i in range(2)]
    data.write_tfrecords(np.arange(n, dtype=np.float32)[:, None], np.zeros(n, np.int64), files)
    ranks = run(tmp_path, 3, 6, ["--data.source=tfrecord", f"--data.path={tmp_path}", "--data.input_shape=[1]"])
    steps = {r["steps"] for r in ranks}
    assert len(steps) == 1, "ranks must agree on one step count"
    assert steps == {min(len(range(r, n, 3)) for r in range(3)) // 2}
    assert all(len(r["batches"]) == r["steps"] for r in ranks)
    seen = [i for r in ranks for batch in r["batches"] for i in batch]
    assert len(seen) == len(set(seen)), "a record was read by two ranks"
