"""Runs inside each rank: record which examples this rank's training batches hold (epoch 0), after the same
validation and step agreement the trainer does.

usage: data_worker.py OUT_DIR GLOBAL_BATCH [data config overrides...]
"""
import json
import sys
from pathlib import Path

from hvdtrain import data, dist, world
from hvdtrain.config import load_config

out, global_batch = Path(sys.argv[1]), int(sys.argv[2])
cfg = load_config(None, sys.argv[3:] + [f"--trainer.global_batch_size={global_batch}"])
w = world.start(cfg.runtime)
source = data.open_source(cfg.data)
source.adopt("train", dist.gather_agreed(lambda: source.validate(w, "train"), "test.validate"))
steps = int(dist.allreduce_min([source.local_steps(w, global_batch)], "test.steps")[0])
batches = [[int(v) for v in x.numpy().reshape(len(x), -1)[:, 0]]
           for x, _ in source.train_batches(w, global_batch, steps, 0, 1)]
(out / f"rank{w.rank}.json").write_text(json.dumps({"steps": steps, "batches": batches}))
