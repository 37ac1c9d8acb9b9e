"""`hvdtrain predict`'s output file without a launcher (ranks simulated with World values): the ranks' dealt
batches merged by rank 0 in batch order give the bytes of one process in every format, with `index` the position
among the listed inputs (a skipped input keeps its number) and `path` the input's file."""
import csv
import json

import numpy as np
import pytest

from hvdtrain.data import dealt_batches
from hvdtrain.inference import OrderedOutput
from hvdtrain.tasks import Task
from hvdtrain.world import World

TASK = Task("classification", 3)
CLASSES = ["cat", "dog", "eel"]
LISTED = [i for i in range(30) if i not in (0, 7, 20)]          # inputs 0, 7 and 20 were skipped
PATHS = [f"photos/{i:02d}{',x' if i == 5 else ''}.png" for i in LISTED]   # one name with a comma
FIELDS = ("class", "name", "probs", "path")


def values(a: int, b: int) -> dict:
    rng = np.random.default_rng(a)
    classes = np.arange(a, b) % 3
    return {"class": classes, "name": np.asarray(CLASSES)[classes], "path": np.asarray(PATHS[a:b]),
            "probs": rng.random((b - a, 3), dtype=np.float32)}


def written(path, size: int, batch: int) -> bytes:
    """Every simulated rank writes its dealt batches into its part; rank 0 merges them."""
    outs = [OrderedOutput(path, FIELDS, World(rank=r, size=size), "tok", TASK, paths=True) for r in range(size)]
    for rank, out in enumerate(outs):
        out.open(CLASSES)
        out.begin(PATHS)
        for a, b in dealt_batches(len(LISTED), batch, rank, size):
            out.write(np.asarray(LISTED[a:b]), values(a, b))
        out.close()
    outs[0].merge(len(LISTED), [out.lengths for out in outs])
    for out in outs:
        out.discard()
    return path.read_bytes()


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".npy"])
def test_rank_parts_merge_in_batch_order_to_one_process_bytes_with_listed_index_and_path(tmp_path, suffix):
    one = written(tmp_path / f"one{suffix}", 1, 4)
    for size in (2, 3, 5):
        assert written(tmp_path / f"many{suffix}", size, 4) == one, size
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"many{suffix}", f"one{suffix}"]   # no part left
    target = tmp_path / f"one{suffix}"
    if suffix == ".csv":
        rows = list(csv.reader(target.open()))
        assert rows[0] == ["index", "class", "name", "prob_0", "prob_1", "prob_2", "path"]
        assert [(int(r[0]), r[-1]) for r in rows[1:]] == list(zip(LISTED, PATHS))
    elif suffix == ".jsonl":
        lines = [json.loads(line) for line in target.read_text().splitlines()]
        assert [(line["index"], line["path"]) for line in lines] == list(zip(LISTED, PATHS))
    else:
        array = np.load(target)
        assert array.dtype.names == FIELDS and list(array["path"]) == PATHS
        assert np.array_equal(array["probs"], np.concatenate([values(a, min(a + 4, 27))["probs"] for a in range(0, 27, 4)]))
