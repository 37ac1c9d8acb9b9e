"""Runs inside each rank: record which examples this rank's training batches hold (epoch 0), after the same
validation and step agreement the trainer does, for several data sets one after another (start-up paid once).

usage: data_worker.py CASES.json OUT_DIR     CASES.json: {name: {"global_batch": N, "overrides": [data overrides]}}
Writes OUT_DIR/<name>-rank<R>.json: {"steps": agreed steps, "batches": [[example ids of each batch]]}.
"""
import json
import sys
from pathlib import Path

from hvdtrain import backend, data, world
from hvdtrain.config import load_config


def batches(global_batch: int, overrides: list[str]) -> tuple[int, dict]:
    cfg = load_config(None, overrides + [f"--trainer.global_batch_size={global_batch}"])
    w = world.start(cfg.runtime)
    source = data.open_source(cfg.data)
    source.adopt("train", backend.gather_agreed(lambda: source.validate(w, "train"), "test.validate"))
    steps = int(backend.allreduce_min([source.local_steps(w, global_batch)], "test.steps")[0])
    held = [[int(v) for v in x.numpy().reshape(len(x), -1)[:, 0]]
            for x, _ in source.train_batches(w, global_batch, steps, 0, 1)]
    return w.rank, {"steps": steps, "batches": held}


cases, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
for name, case in cases.items():
    rank, seen = batches(case["global_batch"], case["overrides"])
    (out / f"{name}-rank{rank}.json").write_text(json.dumps(seen))
